//! The shipping artefacts checked against the binary they ship: every YAML
//! document under `deploy/` parsed into Kubernetes types, the agent's and
//! controller's pod specs compared with the flags, environment variables and
//! defaults `nftpolicy --help` documents, the `Dockerfile` compared with the
//! workspace (`cargo metadata`), and the README's generated configuration
//! reference and metric list compared with the binary and `src/metrics.rs`.
//!
//! Nothing here needs root, a kernel or a Docker engine: the binary is only
//! asked for `--help` and to `render` an empty directory.
//!
//! `UPDATE_EXPECT=1 cargo test -p nftpolicy --test manifests` rewrites the
//! README's configuration reference from the current `--help` output.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[path = "../common/mod.rs"]
mod common;
use common::*;

mod deploy;
mod dockerfile;
mod help;
mod readme;

use dockerfile::*;
use help::*;
