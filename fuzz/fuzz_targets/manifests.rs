//! Decoding untrusted manifests never panics: Kubernetes/Calico YAML (and
//! JSON) files as `nftpolicy` reads them, their conversion to Calico
//! resources, and Calico resources as JSON etcd values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model::calico::Resource;
use model::convert::kube_to_calico;
use model::kube::{parse_manifests, Manifest};

fuzz_target!(|data: &[u8]| {
    // An etcd value is raw bytes.
    if let Ok(resource) = Resource::from_json("fuzz", data) {
        // What decodes must encode and decode again.
        let json = resource.to_json();
        Resource::from_json("fuzz (re-encoded)", json.as_bytes())
            .unwrap_or_else(|e| panic!("re-encoded resource {json} does not decode: {e}"));
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Resource::from_yaml("fuzz", text);
    if let Ok(manifests) = parse_manifests("fuzz", text) {
        for manifest in &manifests {
            if let Manifest::Kube(object) = manifest {
                let _ = kube_to_calico(object);
            }
        }
    }
});
