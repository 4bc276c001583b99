# cablectl: the proxy with its embedded local model. Build: docker build -t cablectl .
FROM python:3.11-slim

# llama-cpp-python compiles llama.cpp from source; bubblewrap sandboxes each kernel
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake bubblewrap \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md config.yaml requirements.lock ./
# every dependency from the lock, hash-checked; then the project itself without resolving again
# a portable build (AVX2, no -march=native): see the README on AMX
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
    pip install --no-cache-dir --require-hashes -r requirements.lock
COPY proxy ./proxy
COPY translators ./translators
COPY grammars ./grammars
RUN pip install --no-cache-dir --no-deps . && useradd --create-home --uid 10001 cablectl

USER cablectl
ENV CABLECTL_HOST=0.0.0.0 CABLECTL_PORT=4000
EXPOSE 4000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:4000/health').status != 200)"
# Kernels run in bubblewrap sandboxes (kernels.sandbox: auto), which need user namespaces. Docker's
# default seccomp and AppArmor profiles refuse them: run with
#   docker run --security-opt seccomp=unconfined --security-opt apparmor=unconfined ...
# (or a seccomp profile that allows clone/unshare with CLONE_NEWUSER). Where that is not allowed
# (many managed Kubernetes platforms), use remote kernels instead: kernels.gateway_url pointing
# at Jupyter Enterprise Gateway with one container per kernel; kernels.sandbox: none only for
# trusted programs.
# Mount your own config over /app/config.yaml, or set CABLECTL_CONFIG.
CMD ["cablectl", "serve", "--config", "/app/config.yaml"]
