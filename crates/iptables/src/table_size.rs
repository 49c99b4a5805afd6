//! A cheap look at a legacy (`x_tables`) table: its entry count and size in
//! bytes, as `IPT_SO_GET_INFO` / `IP6T_SO_GET_INFO` report them — one
//! `getsockopt` on a raw socket, no process, no copy of the rules.
//!
//! `x_tables` sends no change notifications and keeps no generation counter
//! userspace can read, but every replacement of a table (each
//! `iptables-restore`, each `iptables -A/-I/-D/-F/-X/-N`) rebuilds it, and
//! adding, removing or flushing rules changes its entry count and size.
//! What it does not see: a rule replaced by another of exactly the same
//! size (`iptables -R` of a rule with the same matches, another verdict) —
//! left to the periodic full comparison.
//!
//! Needs `CAP_NET_RAW` (the raw socket) and `CAP_NET_ADMIN`, as
//! `iptables-legacy-save` does. Reading a table that the namespace does not
//! have yet instantiates it (as `iptables-legacy-save -t filter` does).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use compiler::render_iptables::IpFamily;

/// `XT_TABLE_MAXNAMELEN`.
const TABLE_NAME_LEN: usize = 32;
/// `NF_INET_NUMHOOKS`.
const HOOKS: usize = 5;
/// `IPT_SO_GET_INFO` and `IP6T_SO_GET_INFO` (`IPT_BASE_CTL`).
const SO_GET_INFO: libc::c_int = 64;

/// `struct ipt_getinfo` / `struct ip6t_getinfo` (the same layout).
#[repr(C)]
struct GetInfo {
    name: [u8; TABLE_NAME_LEN],
    valid_hooks: u32,
    hook_entry: [u32; HOOKS],
    underflow: [u32; HOOKS],
    num_entries: u32,
    size: u32,
}

/// The size of [`GetInfo`], as the kernel's struct has it.
const GET_INFO_LEN: libc::socklen_t = 84;
const _: () = assert!(std::mem::size_of::<GetInfo>() == GET_INFO_LEN as usize);

/// A legacy table's entry count and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TableSize {
    pub entries: u32,
    pub bytes: u32,
}

/// The size of the legacy table `table` (e.g. `filter`) of `family` in the
/// calling thread's network namespace; `None` when the kernel has no such
/// table (`ENOENT`: `x_tables` or the table's module is not loaded).
///
/// # Errors
///
/// A name of 32 bytes or more; the socket or the `getsockopt` failing
/// (`EPERM` without the capabilities above).
pub fn legacy_table_size(family: IpFamily, table: &str) -> io::Result<Option<TableSize>> {
    if table.len() >= TABLE_NAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("table name {table:?} too long"),
        ));
    }
    let (domain, level) = match family {
        IpFamily::V4 => (libc::AF_INET, libc::IPPROTO_IP),
        IpFamily::V6 => (libc::AF_INET6, libc::IPPROTO_IPV6),
    };
    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe {
        libc::socket(
            domain,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a socket we just opened and own.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut info = GetInfo {
        name: [0; TABLE_NAME_LEN],
        valid_hooks: 0,
        hook_entry: [0; HOOKS],
        underflow: [0; HOOKS],
        num_entries: 0,
        size: 0,
    };
    info.name[..table.len()].copy_from_slice(table.as_bytes());
    let mut len = GET_INFO_LEN;
    // SAFETY: the kernel writes at most `len` bytes into `info`, a
    // `#[repr(C)]` struct of that size with the kernel's layout.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            SO_GET_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(TableSize {
        entries: info.num_entries,
        bytes: info.size,
    }))
}
