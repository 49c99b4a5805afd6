//! Kernel (`linux/netlink.h`, `linux/netfilter/nfnetlink*.h`,
//! `nf_tables.h`) and nftables userdata (`libnftnl/udata.h`, nftables'
//! `datatype.h`) constants, in one place so the socket, the encoder and the
//! decoders agree by construction.
//!
//! Where the `libc` crate exports a constant, its value is taken from there
//! (typed for the field it fills: `u8` message types, `u16` flags and
//! attribute types, `u32` register and key values); only what `libc` lacks —
//! mostly `NFTA_*` attribute numbers — is written out, with the header's
//! name.

#![allow(dead_code)]

/// `pub const NAME: TYPE = libc::NAME as TYPE;` for each name: the value is
/// libc's, the type the one the netlink field it fills has.
macro_rules! from_libc {
    ($ty:ty: $($name:ident),+ $(,)?) => {
        $(pub const $name: $ty = libc::$name as $ty;)+
    };
}

// netlink (linux/netlink.h)
from_libc!(i32: NETLINK_NETFILTER, SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_ADD_MEMBERSHIP);
from_libc!(u16:
    NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP_INTR, NLM_F_DUMP, NLM_F_CREATE, NLM_F_APPEND,
    NLM_F_CAPPED, NLM_F_ACK_TLVS, NLMSG_ERROR, NLMSG_DONE,
);
/// `enum nlmsgerr_attrs`: the extended-ACK message and offending offset.
pub const NLMSGERR_ATTR_MSG: u16 = 1;
pub const NLMSGERR_ATTR_OFFS: u16 = 2;

// nfnetlink
from_libc!(u16: NFNL_SUBSYS_NFTABLES, NFNL_SUBSYS_ULOG, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END);
from_libc!(u32: NFNLGRP_NFTABLES, NFNLGRP_NFTRACE);
from_libc!(u8: NFPROTO_IPV4, NFPROTO_IPV6);

// enum nf_tables_msg_types
from_libc!(u8:
    NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_DELTABLE,
    NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN, NFT_MSG_DELCHAIN,
    NFT_MSG_NEWRULE, NFT_MSG_GETRULE, NFT_MSG_DELRULE,
    NFT_MSG_NEWSET, NFT_MSG_GETSET, NFT_MSG_DELSET,
    NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM,
    NFT_MSG_NEWGEN, NFT_MSG_GETGEN, NFT_MSG_TRACE, NFT_MSG_NEWOBJ, NFT_MSG_DELOBJ,
);
pub const NFT_MSG_NEWFLOWTABLE: u8 = 22;
pub const NFT_MSG_DELFLOWTABLE: u8 = 24;
/// ≥ 6.3: like DELTABLE but no ENOENT when the table does not exist.
pub const NFT_MSG_DESTROYTABLE: u8 = 26;

pub fn msg_type(t: u8) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | t as u16
}

pub fn msg_kind(t: u8) -> &'static str {
    match t {
        NFT_MSG_NEWTABLE => "NEWTABLE",
        NFT_MSG_GETTABLE => "GETTABLE",
        NFT_MSG_DELTABLE => "DELTABLE",
        NFT_MSG_NEWCHAIN => "NEWCHAIN",
        NFT_MSG_GETCHAIN => "GETCHAIN",
        NFT_MSG_DELCHAIN => "DELCHAIN",
        NFT_MSG_NEWRULE => "NEWRULE",
        NFT_MSG_GETRULE => "GETRULE",
        NFT_MSG_DELRULE => "DELRULE",
        NFT_MSG_NEWSET => "NEWSET",
        NFT_MSG_GETSET => "GETSET",
        NFT_MSG_DELSET => "DELSET",
        NFT_MSG_NEWSETELEM => "NEWSETELEM",
        NFT_MSG_GETSETELEM => "GETSETELEM",
        NFT_MSG_DELSETELEM => "DELSETELEM",
        NFT_MSG_GETGEN => "GETGEN",
        NFT_MSG_DESTROYTABLE => "DESTROYTABLE",
        _ => "OTHER",
    }
}

// Tables
pub const NFTA_TABLE_NAME: u16 = 1;
pub const NFTA_TABLE_FLAGS: u16 = 2;

// Chains
pub const NFTA_CHAIN_TABLE: u16 = 1;
pub const NFTA_CHAIN_HANDLE: u16 = 2;
pub const NFTA_CHAIN_NAME: u16 = 3;
pub const NFTA_CHAIN_HOOK: u16 = 4;
pub const NFTA_CHAIN_POLICY: u16 = 5;
pub const NFTA_CHAIN_TYPE: u16 = 7;
pub const NFTA_HOOK_HOOKNUM: u16 = 1;
pub const NFTA_HOOK_PRIORITY: u16 = 2;

// Rules
pub const NFTA_RULE_TABLE: u16 = 1;
pub const NFTA_RULE_CHAIN: u16 = 2;
pub const NFTA_RULE_HANDLE: u16 = 3;
pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub const NFTA_RULE_POSITION: u16 = 6;
pub const NFTA_RULE_USERDATA: u16 = 7;

pub const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_EXPR_NAME: u16 = 1;
pub const NFTA_EXPR_DATA: u16 = 2;

pub const NFTA_DATA_VALUE: u16 = 1;
pub const NFTA_DATA_VERDICT: u16 = 2;
pub const NFTA_VERDICT_CODE: u16 = 1;
pub const NFTA_VERDICT_CHAIN: u16 = 2;

// Registers
from_libc!(u32: NFT_REG_VERDICT, NFT_REG_1, NFT_REG32_00);

// Verdict codes (netfilter.h NF_DROP/NF_ACCEPT; nf_tables.h for the rest)
from_libc!(i32: NF_DROP, NF_ACCEPT, NFT_CONTINUE, NFT_BREAK, NFT_JUMP, NFT_GOTO, NFT_RETURN);

// immediate
pub const NFTA_IMMEDIATE_DREG: u16 = 1;
pub const NFTA_IMMEDIATE_DATA: u16 = 2;
// cmp
pub const NFTA_CMP_SREG: u16 = 1;
pub const NFTA_CMP_OP: u16 = 2;
pub const NFTA_CMP_DATA: u16 = 3;
from_libc!(u32: NFT_CMP_EQ, NFT_CMP_NEQ, NFT_CMP_LT, NFT_CMP_LTE, NFT_CMP_GT, NFT_CMP_GTE);
// bitwise
pub const NFTA_BITWISE_SREG: u16 = 1;
pub const NFTA_BITWISE_DREG: u16 = 2;
pub const NFTA_BITWISE_LEN: u16 = 3;
pub const NFTA_BITWISE_MASK: u16 = 4;
pub const NFTA_BITWISE_XOR: u16 = 5;
pub const NFTA_BITWISE_OP: u16 = 6;
/// A shift amount: a bitwise expression carrying it is not one of ours.
pub const NFTA_BITWISE_DATA: u16 = 7;
pub const NFT_BITWISE_BOOL: u32 = 0;
// meta
pub const NFTA_META_DREG: u16 = 1;
pub const NFTA_META_KEY: u16 = 2;
pub const NFTA_META_SREG: u16 = 3;
from_libc!(u32: NFT_META_MARK, NFT_META_IIFNAME, NFT_META_OIFNAME, NFT_META_L4PROTO, NFT_META_NFTRACE);
// ct
pub const NFTA_CT_DREG: u16 = 1;
pub const NFTA_CT_KEY: u16 = 2;
pub const NFTA_CT_DIRECTION: u16 = 3;
from_libc!(u32: NFT_CT_STATE);
// payload
pub const NFTA_PAYLOAD_DREG: u16 = 1;
pub const NFTA_PAYLOAD_BASE: u16 = 2;
pub const NFTA_PAYLOAD_OFFSET: u16 = 3;
pub const NFTA_PAYLOAD_LEN: u16 = 4;
/// A payload *write*: not one of ours.
pub const NFTA_PAYLOAD_SREG: u16 = 5;
from_libc!(u32: NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER);
// lookup
pub const NFTA_LOOKUP_SET: u16 = 1;
pub const NFTA_LOOKUP_SREG: u16 = 2;
pub const NFTA_LOOKUP_DREG: u16 = 3;
pub const NFTA_LOOKUP_SET_ID: u16 = 4;
pub const NFTA_LOOKUP_FLAGS: u16 = 5;
from_libc!(u32: NFT_LOOKUP_F_INV);
// range
pub const NFTA_RANGE_SREG: u16 = 1;
pub const NFTA_RANGE_OP: u16 = 2;
pub const NFTA_RANGE_FROM_DATA: u16 = 3;
pub const NFTA_RANGE_TO_DATA: u16 = 4;
from_libc!(u32: NFT_RANGE_EQ, NFT_RANGE_NEQ);
// counter
pub const NFTA_COUNTER_BYTES: u16 = 1;
pub const NFTA_COUNTER_PACKETS: u16 = 2;
// log
pub const NFTA_LOG_GROUP: u16 = 1;
pub const NFTA_LOG_PREFIX: u16 = 2;
pub const NFTA_LOG_SNAPLEN: u16 = 3;
pub const NFTA_LOG_QTHRESHOLD: u16 = 4;
pub const NFTA_LOG_LEVEL: u16 = 5;
pub const NFTA_LOG_FLAGS: u16 = 6;
/// The level the kernel reports for a log without a group (`LOGLEVEL_WARNING`).
pub const NFT_LOG_DEFAULT_LEVEL: u32 = 4;
// limit
pub const NFTA_LIMIT_RATE: u16 = 1;
pub const NFTA_LIMIT_UNIT: u16 = 2;
pub const NFTA_LIMIT_BURST: u16 = 3;
pub const NFTA_LIMIT_TYPE: u16 = 4;
pub const NFTA_LIMIT_FLAGS: u16 = 5;
from_libc!(u32: NFT_LIMIT_PKTS);
/// nft's default burst for `limit rate N/second`.
pub const NFT_LIMIT_DEFAULT_BURST: u32 = 5;

// Sets
pub const NFTA_SET_TABLE: u16 = 1;
pub const NFTA_SET_NAME: u16 = 2;
pub const NFTA_SET_FLAGS: u16 = 3;
pub const NFTA_SET_KEY_TYPE: u16 = 4;
pub const NFTA_SET_KEY_LEN: u16 = 5;
pub const NFTA_SET_DATA_TYPE: u16 = 6;
pub const NFTA_SET_DATA_LEN: u16 = 7;
pub const NFTA_SET_DESC: u16 = 9;
pub const NFTA_SET_ID: u16 = 10;
pub const NFTA_SET_USERDATA: u16 = 13;
pub const NFTA_SET_DESC_CONCAT: u16 = 2;
pub const NFTA_SET_FIELD_LEN: u16 = 1;
from_libc!(u32: NFT_SET_ANONYMOUS, NFT_SET_INTERVAL, NFT_SET_MAP, NFT_DATA_VERDICT);
pub const NFT_SET_CONCAT: u32 = 0x80;

pub const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
pub const NFTA_SET_ELEM_KEY: u16 = 1;
pub const NFTA_SET_ELEM_DATA: u16 = 2;
pub const NFTA_SET_ELEM_FLAGS: u16 = 3;
pub const NFTA_SET_ELEM_USERDATA: u16 = 6;
pub const NFTA_SET_ELEM_KEY_END: u16 = 10;
from_libc!(u32: NFT_SET_ELEM_INTERVAL_END);

// Generation (`enum nft_gen_attributes`)
pub const NFTA_GEN_ID: u16 = 1;
pub const NFTA_GEN_PROC_PID: u16 = 2;
pub const NFTA_GEN_PROC_NAME: u16 = 3;

// Trace events (`enum nft_trace_attributes`, `enum nft_trace_types`)
pub const NFTA_TRACE_TABLE: u16 = 1;
pub const NFTA_TRACE_CHAIN: u16 = 2;
pub const NFTA_TRACE_RULE_HANDLE: u16 = 3;
pub const NFTA_TRACE_TYPE: u16 = 4;
pub const NFTA_TRACE_VERDICT: u16 = 5;
pub const NFTA_TRACE_ID: u16 = 6;
pub const NFTA_TRACE_POLICY: u16 = 16;
from_libc!(u32: NFT_TRACETYPE_POLICY, NFT_TRACETYPE_RETURN, NFT_TRACETYPE_RULE);

// NFLOG (linux/netfilter/nfnetlink_log.h)
from_libc!(u16:
    NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG, NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_QTHRESH,
    NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV, NFULA_PAYLOAD, NFULA_PREFIX,
);
from_libc!(u8: NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND, NFULNL_COPY_PACKET);

// nftables datatypes (src/datatype.h, enum datatypes), for NFTA_SET_KEY_TYPE
pub const TYPE_VERDICT: u32 = 1;
pub const TYPE_IPADDR: u32 = 7;
pub const TYPE_IP6ADDR: u32 = 8;
pub const TYPE_INET_PROTOCOL: u32 = 12;
pub const TYPE_INET_SERVICE: u32 = 13;
pub const TYPE_MARK: u32 = 19;
pub const TYPE_IFNAME: u32 = 41;
/// `TYPE_BITS`: concatenated types are packed 6 bits per field.
pub const TYPE_BITS: u32 = 6;

pub fn concat_type(types: &[u32]) -> u32 {
    types.iter().fold(0, |acc, t| (acc << TYPE_BITS) | t)
}

// nftables byte orders (enum byteorder) stored in set userdata
pub const BYTEORDER_INVALID: u32 = 0;
pub const BYTEORDER_HOST_ENDIAN: u32 = 1;
pub const BYTEORDER_BIG_ENDIAN: u32 = 2;

// libnftnl userdata TLV types
pub const NFTNL_UDATA_RULE_COMMENT: u8 = 0;
pub const NFTNL_UDATA_SET_KEYBYTEORDER: u8 = 0;
pub const NFTNL_UDATA_SET_DATABYTEORDER: u8 = 1;
pub const NFTNL_UDATA_SET_DATA_INTERVAL: u8 = 6;
pub const NFTNL_UDATA_SET_COMMENT: u8 = 7;
pub const NFTNL_UDATA_SET_ELEM_FLAGS: u8 = 1;
/// Element userdata flag nft sets on an interval's start element when the
/// interval runs to the end of the key space (it then has no end element).
pub const NFTNL_SET_ELEM_F_INTERVAL_OPEN: u32 = 0x1;
/// nft refuses longer comments (`NFTNL_UDATA_COMMENT_MAXLEN`).
pub const NFTNL_UDATA_COMMENT_MAXLEN: usize = 128;

from_libc!(usize: IFNAMSIZ);
/// `NFT_NAME_MAXLEN` includes the NUL.
pub const NFT_NAME_MAXLEN: usize = 256;

from_libc!(u8: IPPROTO_ICMP, IPPROTO_ICMPV6);
