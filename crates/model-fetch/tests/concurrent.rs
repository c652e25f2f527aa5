//! Fetches racing each other (test threads of one binary, and separate test binaries, on a
//! fresh machine): every caller gets the checked model, none trips over another's files.
//! The race is real: two processes, each with two threads, into one empty cache.

use std::path::Path;
use std::process::Command;

const CHILD_ENV: &str = "KCM_FETCH_TEST_CACHE";
const NAME: &str = "two_processes_of_two_threads_fetch_into_one_empty_cache";

fn fetch_twice_in_threads(cache: &Path) {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| s.spawn(|| model_fetch::gemma3_270m(cache)))
            .collect();
        for h in handles {
            let path = h.join().expect("thread").expect("fetch");
            assert_eq!(path, cache.join(model_fetch::GEMMA_FILE));
        }
    });
}

#[test]
fn two_processes_of_two_threads_fetch_into_one_empty_cache() {
    if let Some(cache) = std::env::var_os(CHILD_ENV) {
        // Child: fetch, then exit through the test harness.
        fetch_twice_in_threads(Path::new(&cache));
        return;
    }
    let dir = tempfile::tempdir_in(model_fetch::default_cache_dir().parent().expect("target"))
        .expect("tempdir");
    let cache = dir.path().join("models");
    let exe = std::env::current_exe().expect("test binary");
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(&exe)
                .args(["--exact", NAME, "--test-threads", "1"])
                .env(CHILD_ENV, &cache)
                .spawn()
                .expect("spawn")
        })
        .collect();
    for mut c in children {
        assert!(
            c.wait().expect("wait").success(),
            "a concurrent fetch failed"
        );
    }
    let model = cache.join(model_fetch::GEMMA_FILE);
    assert_eq!(
        model_fetch::sha256_file(&model).expect("model"),
        model_fetch::GEMMA_SHA256
    );
    // Nothing left behind but the model and its stamp.
    let mut left: Vec<String> = std::fs::read_dir(&cache)
        .expect("cache")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            model_fetch::GEMMA_FILE.to_owned(),
            format!("{}.sha256-ok", model_fetch::GEMMA_FILE)
        ]
    );
}
