// SPDX-License-Identifier: Apache-2.0
//! Compiles every `.proto` under `proto/piccolo/broker/v1` (adding a broker service is adding a
//! file) and the update worker's `proto/piccolo/updater/v1/updater.proto`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from("proto/piccolo/broker/v1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    let updater = PathBuf::from("proto/piccolo/updater/v1/updater.proto");
    println!("cargo:rerun-if-changed={}", updater.display());
    files.push(updater);
    println!("cargo:rerun-if-changed={}", dir.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    tonic_prost_build::configure().compile_protos(&files, &[PathBuf::from("proto")])?;
    Ok(())
}
