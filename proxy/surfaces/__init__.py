"""API surfaces beside chat completions: OpenAI's Responses API and Anthropic's Messages API.

Each is a parser (the wire request -> the neutral conversation, a chat-completions payload)
and a renderer (the action loop's events -> the wire response, JSON or SSE). ``bridge``
turns an upstream's chat-completions answer into the same events, for requests without
tools; ``response_store`` keeps responses for ``previous_response_id``.
"""

from proxy.surfaces.bridge import events_from_chat_body, events_from_chat_sse
from proxy.surfaces.messages import (
    MessagesCall,
    messages_error,
    messages_error_event,
    parse_count_tokens_request,
    parse_messages_request,
    render_messages_json,
    render_messages_sse,
)
from proxy.surfaces.response_store import ResponseStore
from proxy.surfaces.responses import (
    ResponsesCall,
    parse_responses_request,
    render_responses_json,
    render_responses_sse,
    response_deleted_body,
)

__all__ = [
    "MessagesCall",
    "ResponseStore",
    "ResponsesCall",
    "events_from_chat_body",
    "events_from_chat_sse",
    "messages_error",
    "messages_error_event",
    "parse_count_tokens_request",
    "parse_messages_request",
    "parse_responses_request",
    "render_messages_json",
    "render_messages_sse",
    "render_responses_json",
    "render_responses_sse",
    "response_deleted_body",
]
