# syntax=docker/dockerfile:1
#
# sluice's image: `docker build -t sluice:0.1.0 .` from the repository root
# (the tag deploy/daemonset.yaml names).
#
# Not built in this repository's CI: the development machines have no
# container engine. deploy/tests/manifests.rs checks what can be checked
# without one (stages, the cargo command, the capabilities, USER, ENTRYPOINT),
# against deploy/daemonset.yaml.

ARG RUST_VERSION=1.95

# --- build: compile the `sluice` package in release mode ---------------------
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice \
    && install -D -m 0755 target/release/sluice /out/sluice

# --- runtime: glibc (the build stage's Debian release), no shell tools -------
FROM debian:bookworm-slim AS runtime
# File capabilities. The DaemonSet adds NET_ADMIN and NET_BIND_SERVICE, but a
# non-root process keeps no capability across execve() unless the binary
# carries it as a file capability (the security.capability xattr); the
# capabilities must also be no more than the DaemonSet adds, or the kernel
# refuses to exec the binary.
#
# The capabilities are set here, in the final stage, in the same RUN that
# installs the binary, rather than in the build stage: COPY (--from, or from
# the context) has not reliably kept the security.capability xattr across
# builders and versions (moby/moby#38132, moby/buildkit#2250,
# GoogleContainerTools/kaniko#2866). Setting them in the layer that ships them
# leaves no copy to lose them, and `setcap -v` fails the build if they did not
# stick. A bind mount brings the binary in without a second copy of it in the
# image; libcap2-bin (setcap) is removed again in the same layer.
#
# `nft` (package nftables) programs sluice's table with --intercept nftables
# and --cleanup. sluice runs it as a child: a non-root process's file
# capabilities do not pass through execve(), so `nft` carries NET_ADMIN
# itself.
RUN --mount=type=bind,from=build,source=/out/sluice,target=/tmp/sluice \
    apt-get update \
    && apt-get install -y --no-install-recommends libcap2-bin nftables \
    && install -m 0755 /tmp/sluice /usr/local/bin/sluice \
    && setcap cap_net_admin,cap_net_bind_service+ep /usr/local/bin/sluice \
    && setcap -v cap_net_admin,cap_net_bind_service+ep /usr/local/bin/sluice \
    && setcap cap_net_admin+ep /usr/sbin/nft \
    && setcap -v cap_net_admin+ep /usr/sbin/nft \
    && apt-get purge -y --auto-remove libcap2-bin \
    && rm -rf /var/lib/apt/lists/*
# Numeric, so runAsNonRoot can verify it without an /etc/passwd entry; the
# DaemonSet's runAsUser/runAsGroup say the same.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sluice"]
