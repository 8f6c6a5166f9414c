//! Builds the sockmap forwarding program (`bpf/sockmap.bpf.c`, issue 18)
//! with clang when clang is there. Without it the crate still builds: a
//! cargo warning says so, and `SLUICE_FORWARD=sockmap` reports
//! "unavailable: built without clang" at run time and forwards with splice.
//!
//! `SLUICE_BPF_CLANG` names another clang; `SLUICE_BPF_CLANG=none` builds
//! without the program on purpose (to test the fallback).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(sluice_sockmap)");
    println!("cargo:rerun-if-changed=bpf/sockmap.bpf.c");
    println!("cargo:rerun-if-env-changed=SLUICE_BPF_CLANG");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let clang = std::env::var("SLUICE_BPF_CLANG").unwrap_or_else(|_| "clang".into());
    if clang == "none" {
        println!("cargo:warning=sockmap forwarding left out (SLUICE_BPF_CLANG=none)");
        return;
    }
    let Some(out_dir) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        println!("cargo:warning=sockmap forwarding left out: OUT_DIR is not set");
        return;
    };
    let object = out_dir.join("sockmap.bpf.o");
    // Debian keeps <asm/types.h> under the multiarch directory, which
    // `-target bpf` does not search by itself.
    let multiarch = Command::new(&clang)
        .arg("-print-multiarch")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty());
    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"]);
    if let Some(m) = multiarch {
        cmd.arg(format!("-I/usr/include/{m}"));
    }
    cmd.args(["-c", "bpf/sockmap.bpf.c", "-o"]).arg(&object);
    match cmd.output() {
        Ok(o) if o.status.success() => println!("cargo:rustc-cfg=sluice_sockmap"),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let first = err.lines().next().unwrap_or("no output");
            println!(
                "cargo:warning=sockmap forwarding left out: {clang} failed on bpf/sockmap.bpf.c ({first}); install clang and libbpf-dev"
            );
        }
        Err(e) => println!(
            "cargo:warning=sockmap forwarding left out: cannot run {clang} ({e}); install clang and libbpf-dev"
        ),
    }
}
