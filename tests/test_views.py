"""``cablectl sessions show``'s tree for the events this session's features add: approvals,
artifacts and promoted functions, under the action they belong to."""

from __future__ import annotations

from proxy.views import session_tree


def test_approvals_artifacts_and_promoted_functions_show_under_their_action() -> None:
    events = [
        {"kind": "tools", "digest": "abc", "owner": "alice"},
        {
            "kind": "turn",
            "turn": 1,
            "mode": "kernel",
            "model": "m",
            "source": "open('a.csv','w')",
            "thought": "t",
        },
        {"kind": "library", "turn": 1, "digest": "d1", "source": "def f(): ..."},
        {
            "kind": "call",
            "turn": 1,
            "call_id": "call_s_1_x",
            "tool": "approve_action",
            "arguments": {"kind": "program"},
            "approval": "program",
        },
        {"kind": "result", "call_id": "call_s_1_x", "value": "yes"},
        {"kind": "approval", "turn": 1, "what": "program", "approved": True, "reason": "yes", "by": "alice"},
        {"kind": "artifact", "turn": 1, "name": "a.csv", "size": 3, "sha256": "f" * 64, "stored": True},
        {"kind": "artifact", "turn": 1, "name": "big.bin", "size": 9, "sha256": "e" * 64, "stored": False},
        {"kind": "artifact", "turn": 1, "name": "old.txt", "deleted": True},
        {"kind": "cell_end", "turn": 1, "output": "", "error": None, "duration_ms": 3.0},
    ]
    text = "\n".join(session_tree("s", events).lines())
    assert "promoted functions defined · d1" in text
    assert "program approved by alice: yes" in text
    assert "artifact a.csv · 3 bytes · sha256 ffffffffffff · kept" in text
    assert "artifact big.bin · 9 bytes · sha256 eeeeeeeeeeee · too large, not kept" in text
    assert "artifact old.txt · deleted" in text
    action = text.index("action (kernel)")
    assert action < text.index("program approved") and action < text.index("artifact a.csv")
