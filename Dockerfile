# syntax=docker/dockerfile:1
#
# The nftpolicy image.
#
#   docker build -t nftpolicy:0.1.0 .                                    # nftables mode (default)
#   docker build -t nftpolicy:0.1.0-iptables --target runtime-iptables .  # adds iptables + ipset
#
# The default image holds the binary and glibc, nothing else: nftpolicy
# programs nftables over netlink itself and needs no `nft` binary. The
# iptables backend (`--backend iptables`) runs iptables-{legacy,nft}-restore
# and `ipset`; only the `runtime-iptables` target installs them.
#
# The agent runs as root, with every capability dropped except CAP_NET_ADMIN
# (deploy/daemonset.yaml). It cannot run as a non-root user: Kubernetes gives
# added capabilities to root only (a non-root user would need file
# capabilities on the binary *and* allowPrivilegeEscalation, which is worse).
# The controller (`nftpolicy controller`) needs no capability and runs as
# nobody (deploy/controller.yaml).
#
# crates/agent/tests/manifests/ checks this file against the workspace: the
# `cargo build` line builds the package and binary the tests exercise, every
# workspace member is copied, and ENTRYPOINT/CMD name the binary and a real
# subcommand.

# ---------------------------------------------------------------------------
# Builder. Same Debian release as the runtime stages, so the binary's glibc
# requirement matches what it runs on.
FROM rust:1-bookworm AS builder
# etcd-client's build script compiles the etcd protobufs with protoc; they
# import google/protobuf/descriptor.proto, which is in libprotobuf-dev (not
# in protobuf-compiler without recommends). The same packages and the same
# check as `cargo xtask` (xtask/src/tools.rs): protoc must compile a file
# that imports it, or the image build stops here rather than after minutes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/* \
 && printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\nmessage Check { google.protobuf.FileDescriptorSet files = 1; }\n' > /tmp/check.proto \
 && protoc -I/tmp --include_imports -o /dev/null /tmp/check.proto \
 && rm /tmp/check.proto
WORKDIR /src
# The whole workspace: Cargo needs every member's manifest (and targets) to
# load it, and --locked needs the lock file that goes with them.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY crates crates
COPY xtask xtask
COPY tests tests
COPY bench bench
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nftpolicy --bin nftpolicy \
 && install -D -m 0755 target/release/nftpolicy /out/nftpolicy

# ---------------------------------------------------------------------------
# iptables mode: `docker build --target runtime-iptables .`
# iptables-legacy-restore/-save, iptables-nft-restore/-save (both from the
# `iptables` package) and ipset. No nftables package: the `nft` binary is
# never used.
FROM debian:bookworm-slim AS runtime-iptables
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ipset \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/nftpolicy /usr/local/bin/nftpolicy
# Two glibc malloc arenas, not one per thread: under pod churn the extra
# arenas keep freed memory as RSS (bench/examples/churn_memory.rs).
ENV MALLOC_ARENA_MAX=2
ENTRYPOINT ["nftpolicy"]
CMD ["run"]

# ---------------------------------------------------------------------------
# Default (last stage): nftables mode. The binary links only glibc and
# libgcc_s, both in the slim base; etcd TLS uses rustls with the CA given by
# --etcd-ca, so no ca-certificates either.
FROM debian:bookworm-slim AS runtime
COPY --from=builder /out/nftpolicy /usr/local/bin/nftpolicy
# Two glibc malloc arenas, not one per thread: under pod churn the extra
# arenas keep freed memory as RSS (bench/examples/churn_memory.rs).
ENV MALLOC_ARENA_MAX=2
ENTRYPOINT ["nftpolicy"]
CMD ["run"]
