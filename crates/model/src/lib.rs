//! nftpolicy's model of the policy world.
//!
//! - [`calico`]: Calico v3 resources as stored in etcd;
//! - [`admin`]: AdminNetworkPolicy, BaselineAdminNetworkPolicy and
//!   ClusterNetworkPolicy, and their conversion into Calico tiers;
//! - [`fields`]: every field of every kind read, and what is done with it
//!   (used, ignored and why, unimplemented: rejected);
//! - [`reject`]: what a rejected object still does (rejections narrow);
//! - [`kube`]: Kubernetes inputs (Namespace, Pod, NetworkPolicy, List);
//! - [`convert`]: Kubernetes → Calico, as calico-kube-controllers does it;
//! - [`selector`]: the Calico selector language;
//! - [`state`]: the cluster as a set of Calico resources, and the shared
//!   resolution of policies and selectors;
//! - [`endpoint`]: what the state keeps of a workload endpoint;
//! - [`semantics`]: the reference semantics (the test oracle);
//! - [`serviceaccount`]: Calico's service-account matching (profiles,
//!   labels and selectors);
//! - [`scenario`]: scenario files and their results.
//!
//! This crate does no I/O except reading scenario files it is asked to read.

pub mod admin;
pub mod calico;
pub mod convert;
pub mod endpoint;
pub mod fields;
pub mod kube;
pub mod labels;
pub mod reject;
pub mod scenario;
pub mod selector;
pub mod semantics;
pub mod serviceaccount;
pub mod state;

use std::net::IpAddr;

/// Whether `ip` lies in the ranges tests may use: 198.18.0.0/15 and
/// fd00:198:18::/48.
pub fn is_test_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 198 && (o[1] == 18 || o[1] == 19)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            s[0] == 0xfd00 && s[1] == 0x198 && s[2] == 0x18
        }
    }
}
