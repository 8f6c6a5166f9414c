//! sluice's deployment manifests live next to this crate (`deploy/*.yaml`,
//! applied with `kubectl apply -k deploy/`; see `deploy/README.md`). The crate
//! has no code of its own: it exists so that `cargo test -p sluice-deploy`
//! checks every manifest against the Kubernetes API types and the Dockerfile
//! against the DaemonSet (`tests/manifests.rs`), and tries the image's file
//! capabilities on the kernel (`tests/file_capabilities.rs`).
