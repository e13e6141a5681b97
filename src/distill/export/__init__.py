"""Edge export: the trained student as files that run without the training stack.

    stage.py        the `export` stage: prepare (prune? → merged) → each format written and
                    measured → export.json
    formats.py      the formats as data: file, runtime, writer, loader, order (FORMATS);
                    load_runner
    runtime.py      the Runner every format loads into (shared greedy loop); knows no format
    files.py        each format's file name; weight bytes and parameter counts on disk
    merge.py        merged safetensors (PEFT merge_and_unload or the trained merge); PyTorch runner
    quantize.py     int8 (fp16 scale per 32, weight-only), int4 (ORT MatMulNBits, or 4-bit
                    safetensors with `int4_runtime: torch`)
    onnx_export.py  KV-cache ONNX graph (torch.onnx.export) and its ONNX Runtime runner
    gguf_export.py  GGUF through llama.cpp's converter (fetched once), else the built-in writer
    gguf_file.py    the built-in GGUF writer (llama, qwen2) and the GGUF reader
    gguf_runtime.py llama.cpp runner and the numpy reference forward over the GGUF tensors
    prune.py        layer / MLP-channel pruning by importance + a short KD/SFT recovery run
    measure.py      accuracy (evaluate's scorer, batched where the runtime batches), latency
                    p50/p95, tokens/s, peak RSS, agreement
    report.py       the compression table (teacher → student → artifacts) and its plot
    chat.py         `distill chat RUN_DIR --format F`
"""
