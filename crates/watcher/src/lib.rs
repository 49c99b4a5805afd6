//! Datastores → the cluster state as Calico resources.
//!
//! - [`files`]: a directory (or list) of Kubernetes and/or Calico YAML.

pub mod files;
