//! The fuzz targets' corpora (`fuzz/corpus/<target>/`), seeds and every input the fuzzer kept,
//! replayed through the same entry points on the stable toolchain: what the fuzzer once found
//! stays fixed.

#[test]
fn every_corpus_input_runs_through_its_target_without_a_panic() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in chargegate::fuzzing::TARGETS {
        let dir = root.join(name);
        let mut inputs = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("entry").path();
            target(&std::fs::read(&path).expect("input"));
            inputs += 1;
        }
        assert!(inputs > 0, "{name} has a corpus");
    }
}
