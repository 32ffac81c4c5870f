//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) and regression inputs
//! (`fuzz/regressions/<target>/`) through the fuzz targets' own functions, on stable and without
//! libFuzzer, so every input the fuzzer kept stays a test. See `FUZZING.md`.

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

use kata_shim_metrics::fuzzing;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted; empty when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every file through `target`; returns the failures, each with its file name.
fn replay(target: &str, files: &[PathBuf]) -> Vec<String> {
    let mut failures = Vec::new();
    for file in files {
        let data = match fs::read(file) {
            Ok(data) => data,
            Err(err) => {
                failures.push(format!("{}: {err}", file.display()));
                continue;
            }
        };
        match panic::catch_unwind(|| fuzzing::run(target, &data)) {
            Ok(true) => {}
            Ok(false) => failures.push(format!("{target}: no such fuzz target")),
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| payload.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                failures.push(format!("{}: {message}", file.display()));
            }
        }
    }
    failures
}

#[test]
fn every_target_has_a_corpus_and_every_input_passes() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for target in fuzzing::TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target} is missing or empty"
        );
        let regressions = files(&fuzz_dir().join("regressions").join(target));
        replayed += corpus.len() + regressions.len();
        failures.extend(replay(target, &corpus));
        failures.extend(replay(target, &regressions));
    }
    assert!(
        failures.is_empty(),
        "{} of {replayed} inputs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// No stray corpus: every directory under `fuzz/corpus` and `fuzz/regressions` is a target.
#[test]
fn corpus_directories_name_targets() {
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                fuzzing::TARGETS.contains(&name.as_str()),
                "fuzz/{kind}/{name} is not a fuzz target"
            );
        }
    }
}
