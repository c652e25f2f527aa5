//! The monitor across llama.cpp's RPC backend: gemma-3-270m split over two loopback
//! `kcm-rpc-server`s (`-ngl 99 -ts 1,3`, each server `--threads 1`, the client `-t 2`),
//! tokens/s of the generation steps with (a) no eval callback and (b) the monitor's
//! capture and statistics for all layers, runs alternating, the median of each; and the
//! bytes the run moves over RPC, counted by a forwarding proxy in front of each server
//! (both directions), so that the capture's own traffic is the difference between the two
//! modes (the model's upload and the graphs are the same in both). The monitor's runs
//! also report what the capture itself counted (`ggml_backend_tensor_get` from the
//! servers' memory, `RunOutcome::remote_read_bytes`): the prompt's step and the median
//! generated token.
//!
//! `cargo bench -p kqv-trace-monitor --bench rpc` (KCM_BENCH_TOKENS, KCM_BENCH_RUNS
//! override the 32 tokens and 3 runs; KCM_BENCH_JSON=FILE also writes the figures as
//! JSON). Not run for figures yet (see docs/performance.md).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ggml_trace::capture::CaptureConfig;
use ggml_trace::session::{self, RunOptions};
use kcm_cli::capture_args::Options;
use kcm_cli::sink::MonitorSink;
use test_support::rpc_server::RpcServer;
use test_support::timed::{median, Timed};
use test_support::LlamaArgs;

/// Bytes moved through a proxy: client to server, server to client.
#[derive(Default)]
struct Counters {
    to_server: AtomicU64,
    to_client: AtomicU64,
}

impl Counters {
    fn read(&self) -> (u64, u64) {
        (
            self.to_server.load(Ordering::SeqCst),
            self.to_client.load(Ordering::SeqCst),
        )
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, count: Arc<Counters>, to_server: bool) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                let c = if to_server {
                    &count.to_server
                } else {
                    &count.to_client
                };
                c.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A loopback proxy in front of `server` (every connection forwarded, counted); its
/// `127.0.0.1:PORT`.
fn proxy(server: String, count: Arc<Counters>) -> io::Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let at = l.local_addr()?.to_string();
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            let Ok(upstream) = TcpStream::connect(&server) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
                continue;
            };
            let (a, b) = (Arc::clone(&count), Arc::clone(&count));
            std::thread::spawn(move || pump(client, upstream, a, true));
            std::thread::spawn(move || pump(u2, c2, b, false));
        }
    });
    Ok(at)
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let tokens = env("KCM_BENCH_TOKENS", 32) as u32;
    let runs = env("KCM_BENCH_RUNS", 3);
    let model = model_fetch::gemma3_270m(&model_fetch::default_cache_dir()).expect("gemma-3-270m");
    let servers = [RpcServer::start(1), RpcServer::start(1)];
    let counts: Vec<Arc<Counters>> = (0..2).map(|_| Arc::default()).collect();
    let endpoints: Vec<String> = servers
        .iter()
        .zip(&counts)
        .map(|(s, c)| proxy(s.endpoint(), Arc::clone(c)).expect("proxy"))
        .collect();
    let llama_args = LlamaArgs::new(&model, "The capital of France is")
        .n(tokens)
        .threads(2)
        .greedy()
        .flash(true)
        .args(["--rpc", &endpoints.join(","), "-ngl", "99", "-ts", "1,3"])
        .build();
    let modes = ["no callback", "monitor (all layers, stats)"];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    // Per run: bytes to the servers, bytes from them, steps decoded.
    let mut bytes: Vec<Vec<(u64, u64, u32)>> = vec![Vec::new(); modes.len()];
    // The monitor's runs, as the capture counted its reads: (prompt step, median of the
    // generated tokens' steps).
    let mut counted: Vec<(f64, f64)> = Vec::new();
    for _ in 0..runs {
        for (m, (rate, moved)) in rates.iter_mut().zip(bytes.iter_mut()).enumerate() {
            let opts = Options {
                quiet: true,
                llama_args: llama_args.clone(),
                ..Options::default()
            };
            let inner = (m == 1).then(|| {
                MonitorSink::new(
                    &opts,
                    Box::new(io::sink()),
                    Arc::new(AtomicBool::new(false)),
                )
                .expect("sink")
            });
            let mut timed = Timed::new(inner);
            let run_opts = RunOptions {
                capture: CaptureConfig {
                    from_step: 0,
                    layer: None,
                    trace_sources: true,
                    keep: true,
                    logits: false,
                    kv_audit: ggml_trace::capture::DEFAULT_KV_AUDIT,
                    nodes: None,
                },
                prefill_only: false,
                verbose: false,
                eval_callback: m > 0,
            };
            let before: Vec<(u64, u64)> = counts.iter().map(|c| c.read()).collect();
            let (info, outcome) = session::run(&llama_args, run_opts, &mut timed).expect("run");
            rate.push(timed.tokens_per_s(Instant::now()));
            let after: Vec<(u64, u64)> = counts.iter().map(|c| c.read()).collect();
            let (up, down) = before
                .iter()
                .zip(&after)
                .fold((0, 0), |(u, d), (b, a)| (u + a.0 - b.0, d + a.1 - b.1));
            moved.push((up, down, outcome.steps));
            if m == 1 {
                let per_step = &outcome.remote_read_bytes;
                let decode: Vec<f64> = per_step.iter().skip(1).map(|&b| b as f64).collect();
                counted.push((
                    per_step.first().map_or(0.0, |&b| b as f64),
                    if decode.is_empty() {
                        0.0
                    } else {
                        median(&decode)
                    },
                ));
            }
            if let Some(sink) = timed.inner.take() {
                sink.finish(&info, &outcome).expect("finish");
            }
        }
    }
    let base = median(&rates[0]);
    let med = |v: &[(u64, u64, u32)], f: fn(&(u64, u64, u32)) -> u64| {
        median(&v.iter().map(|x| f(x) as f64).collect::<Vec<_>>())
    };
    let steps = bytes[1].first().map_or(0, |x| x.2);
    let extra_down = med(&bytes[1], |x| x.1) - med(&bytes[0], |x| x.1);
    let extra_up = med(&bytes[1], |x| x.0) - med(&bytes[0], |x| x.0);
    println!(
        "gemma-3-270m Q4_K_M over two loopback kcm-rpc-servers (-ngl 99 -ts 1,3), -t 2, -fa on, \
         {tokens} generated tokens, median of {runs} runs"
    );
    let mut json_modes = Vec::new();
    for (m, name) in modes.iter().enumerate() {
        let r = median(&rates[m]);
        let (up, down) = (med(&bytes[m], |x| x.0), med(&bytes[m], |x| x.1));
        println!(
            "{name:<30} {r:8.2} tokens/s   ratio {:.3}   bytes to servers {up:.0}, from servers {down:.0}",
            r / base
        );
        json_modes.push(serde_json::json!({
            "mode": name, "tokens_per_s": r, "ratio": r / base, "runs": rates[m],
            "bytes_to_servers": up, "bytes_from_servers": down,
        }));
    }
    let per_step = |b: f64| b / f64::from(steps.max(1));
    println!(
        "capture's own RPC traffic: {:.0} bytes from the servers and {:.0} to them per step \
         ({steps} steps: the prompt's ubatches and each generated token)",
        per_step(extra_down),
        per_step(extra_up)
    );
    let counted_prompt = median(&counted.iter().map(|c| c.0).collect::<Vec<_>>());
    let counted_token = median(&counted.iter().map(|c| c.1).collect::<Vec<_>>());
    println!(
        "the capture's own count of its reads from the servers: {counted_prompt:.0} bytes in \
         the prompt's step, {counted_token:.0} bytes per generated token (median)"
    );
    if let Some(path) = std::env::var_os("KCM_BENCH_JSON") {
        let doc = serde_json::json!({
            "model": "gemma-3-270m Q4_K_M",
            "servers": 2, "server_threads": 1, "threads": 2, "split": "-ngl 99 -ts 1,3",
            "flash_attn": "on", "tokens": tokens, "runs": runs, "steps": steps,
            "modes": json_modes,
            "capture_bytes_from_servers_per_step": per_step(extra_down),
            "capture_bytes_to_servers_per_step": per_step(extra_up),
            "capture_counted_bytes_prompt_step": counted_prompt,
            "capture_counted_bytes_per_token": counted_token,
        });
        std::fs::write(&path, format!("{doc:#}\n")).expect("write KCM_BENCH_JSON");
    }
    drop(servers);
}
