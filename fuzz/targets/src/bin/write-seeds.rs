//! Writes the fuzz targets' seed inputs to a corpus directory (`fuzz/run` does, before a run):
//! `write-seeds DIR` writes `DIR/<target>/seed-<n>`.

fn main() -> std::process::ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: write-seeds CORPUS_DIR");
        return std::process::ExitCode::from(2);
    };
    let dir = std::path::PathBuf::from(dir);
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for (target, data) in spaced_fuzz_targets::seeds() {
        let n = counts.entry(target).or_default();
        let path = dir.join(target).join(format!("seed-{n}"));
        *n += 1;
        let written =
            std::fs::create_dir_all(dir.join(target)).and_then(|_| std::fs::write(&path, &data));
        if let Err(e) = written {
            eprintln!("write-seeds: {}: {e}", path.display());
            return std::process::ExitCode::from(1);
        }
    }
    std::process::ExitCode::SUCCESS
}
