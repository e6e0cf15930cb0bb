"""Serve a GGUF model with llama.cpp's OpenAI-compatible server (xllamacpp) on 127.0.0.1.

Usage: llm-server.py MODEL_PATH PORT
Endpoints: /v1/chat/completions, /v1/models, /health (503 while the model loads).
Runs until SIGTERM or SIGINT.
"""
import signal
import sys

import xllamacpp as xlc

model, port = sys.argv[1], int(sys.argv[2])
params = xlc.CommonParams()
params.model.path = model
params.hostnames = ["127.0.0.1"]
params.port = port
params.n_ctx = 4096
params.n_parallel = 2
params.cpuparams.n_threads = 2
params.cpuparams_batch.n_threads = 2
params.model_alias = "qwen2.5-coder-1.5b-instruct"
server = xlc.Server(params)
stop = [False]


def handle(_signum, _frame):
    stop[0] = True


signal.signal(signal.SIGTERM, handle)
signal.signal(signal.SIGINT, handle)
while not stop[0]:
    signal.pause()
