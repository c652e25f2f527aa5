//! `kqv-trace-monitor --help`.

pub const USAGE: &str = "\
kqv-trace-monitor: run llama.cpp and trace each layer's attention

USAGE:
    kqv-trace-monitor [llama.cpp options] [monitor options]

MONITOR OPTIONS:
    --layer N            trace only layer N (0-based); -1 or absent: all layers
    --from-step N        trace steps N and later only (each ubatch of the prompt is a step,
                         then each generated token); the earlier steps run untraced, e.g.
                         to look at the decode of a long prompt without its prefill
    --no-trace-sources   trace kqv_out only, not the attention op's inputs and output
    --save-gguf FILE     save the trace to FILE (written atomically); `-` writes it to
                         stdout, and the statistics then go to stderr
    --kv-storage full|delta
                         how --save-gguf stores the trace: delta (default, format version
                         2) stores a KV-cache view as the bytes that changed since the
                         previous step's and identical tensors once; full (version 1)
                         stores every tensor whole, each step's views again, the seed
                         tools' layout for scripts that read the GGUF directly
    --kv-audit N         the capture follows the graph's writes into the KV cache and
                         reads only the cells written; every N steps (default 16) it hashes
                         each K/V view whole and reports (a warning line) a change no
                         graph node made, recorded at that step; 1: hash every step
    --tensor-filter REGEX
                         also trace every graph node whose ggml name matches REGEX
                         (repeatable; anchored at the start of the name, as llama.cpp's
                         llama-debug; `.` traces every node): read after it ran, with its
                         layout, op and type (quantized kept), saved with role node, its
                         layer from the name's -<layer> suffix, and its graph order;
                         --layer N keeps the nodes of layer N. Slow: the graph stops at
                         each node traced
    --prefill-only       decode the prompt only, no generation
    --verify             recompute each traced attention in f64 from its captured q/k/v/mask
                         as it is traced (no --save-gguf needed) and compare with kqv_out:
                         one verdict line per (step, layer) after its statistics (NMSE, max
                         abs error at (position, head, dim), cosine, bound, ok/FAIL, and for
                         a failure the input that explains it), a summary line at the end;
                         exit 1 if any group failed (bounds: docs/verification.md)
    --replay TRACE       decode exactly the steps of an earlier trace (its prompt in the
                         same ubatches, then its tokens one per step) instead of the
                         prompt and sampled tokens, so that two traces compare the same
                         computation step by step; the sampler still chooses after each
                         step and its own choice is recorded (kqv_trace.step.sampled).
                         No -p needed (when given it must be the trace's prompt); -n
                         limits the generated steps replayed
    --logits             also capture each step's output logits (llama.cpp's
                         result_output row of the step's last token; role logits,
                         layer -1): summarised and saved, for tensor-diff-analyzer's KL
                         divergence (n_vocab floats per step: 1 MiB for a 262k vocabulary)
    --json               statistics as JSON Lines (schema: docs/json.md)
    --quiet              no progress line on stderr (it is shown only when stderr is a
                         terminal and the statistics are not: stdout redirected); NO_COLOR
                         turns its colour off. Nor, with --rpc, the line of the bytes read
                         from the servers
    -v, --verbose        show llama.cpp's log on stderr (default: errors only); also
                         passed to llama.cpp
    -h, --help           this help
    -V, --version        version of the tool and of the pinned llama.cpp

LLAMA.CPP OPTIONS:
    Every other argument is parsed by llama.cpp's own `common_params_parse`, so all of
    llama.cpp's options work: -m -p -f -n -c -b -ub -t -ngl -ctk -ctv -fa on|off|auto
    --seed --temp ... A bare `-fa` (as older scripts write it) means `-fa on`.
    Differences from llama.cpp's tools: -n defaults to 0 (the prompt only); without -c
    the context holds the prompt plus -n tokens (rounded up to 256); no warm-up decode;
    the -fit dry run only with an explicit `-fit on`. The model, context and sampler are
    set up as llama.cpp's tools set them up, so --ignore-eos and the other sampling
    options behave as there.
    --rpc HOST:PORT,... splits the model across RPC servers (kcm-rpc-server; with -ngl,
    -ts, -sm layer|none): each endpoint is checked first (a down one, or one of another
    protocol version: one line, exit 2); one that dies mid-run ends the run with one line
    and the trace saved as incomplete (exit 1). The protocol is unauthenticated. The
    run ends with a stderr line (not with --quiet) of the bytes the capture read from the
    servers, in all and per generated token (per step in the trace:
    kqv_trace.run.rpc_read_bytes); a remote K/V view is read only where a step wrote it,
    and whole every --kv-audit steps.

STEPS:
    step 0 is the first ubatch of the prompt; each later llama_decode call (the next
    prompt ubatch, then each generated token) is one more. Every step is traced.

EXIT CODES:
    0  success      1  the run or the save failed, or (--verify) an attention did not
                       verify      2  usage error

EXAMPLES:
    kqv-trace-monitor -m model.gguf -p \"Hello world\" --save-gguf traced_tensors.gguf
    kqv-trace-monitor -m model.gguf -p \"Hello world\" --layer 0 --save-gguf layer0.gguf
    kqv-trace-monitor -m model.gguf -n 4 -p \"Hello, world\" -ctk q4_0 -ctv q4_0 -fa --layer 0
    kqv-trace-monitor -m model.gguf -p \"Hi\" --save-gguf - | gguf-reader -
    kqv-trace-monitor -m model.gguf -p \"Hi\" --tensor-filter 'ffn_out|l_out' --save-gguf ffn.gguf
    kqv-trace-monitor -m model.gguf -p \"Hello world\" -n 4 -fa on --verify
    kqv-trace-monitor -m model.gguf -p \"Hi\" -n 64 --logits --save-gguf f16.gguf
    kqv-trace-monitor -m model.gguf --replay f16.gguf -ctk q4_0 -ctv q4_0 --logits --save-gguf q4.gguf
";
