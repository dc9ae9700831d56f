//! The NBD wire protocol (fixed newstyle handshake, simple and structured replies,
//! the `base:allocation` metadata context), as the Linux
//! kernel client, qemu and libnbd speak it: constants and the encoding and decoding
//! of every message, as pure functions over byte buffers (tested with hostile
//! input next to them). Reference: the NBD protocol document
//! (github.com/NetworkBlockDevice/nbd, doc/proto.md).

/// `NBDMAGIC`: the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the start of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of an option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server): fixed newstyle, no zero padding.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: the client may omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zero padding.
pub const CLIENT_NO_ZEROES: u32 = 2;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort the handshake.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe and select an export.
pub const OPT_GO: u32 = 7;
/// Use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option replies.
pub const REP_ACK: u32 = 1;
/// One export of a LIST.
pub const REP_SERVER: u32 = 2;
/// One item of an INFO/GO.
pub const REP_INFO: u32 = 3;
/// One metadata context of a LIST/SET_META_CONTEXT.
pub const REP_META_CONTEXT: u32 = 4;
/// Option not supported.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
/// Option refused by policy.
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
/// Option malformed.
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
/// TLS first.
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
/// Unknown export.
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

/// INFO items.
pub const INFO_EXPORT: u16 = 0;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1;
/// The export refuses writes.
pub const TFLAG_READ_ONLY: u16 = 2;
/// FLUSH is supported.
pub const TFLAG_SEND_FLUSH: u16 = 4;
/// FUA is supported.
pub const TFLAG_SEND_FUA: u16 = 8;
/// TRIM is supported.
pub const TFLAG_SEND_TRIM: u16 = 32;
/// WRITE_ZEROES is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 64;
/// Several connections may serve one export consistently (flush covers them all).
pub const TFLAG_CAN_MULTI_CONN: u16 = 256;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status (allocation of a range).
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command flag: forced unit access.
pub const CMD_FLAG_FUA: u16 = 1;
/// Command flag of BLOCK_STATUS: one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 8;

/// Structured reply flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: block status descriptors of one context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: an error.
pub const REPLY_TYPE_ERROR: u16 = 0x8001;

/// The one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id on every connection.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// `base:allocation`: not allocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: reads as zeros.
pub const STATE_ZERO: u32 = 2;

/// Longest option payload accepted (names are at most 4096 bytes).
pub const MAX_OPTION_LEN: u32 = 8192;
/// Largest READ or WRITE accepted (advertised as the maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Longest export name.
pub const MAX_NAME: usize = 4096;

/// NBD error numbers (the protocol's own, not the host's errno).
pub mod err {
    /// Operation not permitted (writes to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
}

/// The NBD error for a request completed with `res` (bytes, or -errno).
pub fn nbd_error(res: i32) -> u32 {
    if res >= 0 {
        return 0;
    }
    match -res {
        libc::EPERM | libc::EROFS => err::EPERM,
        libc::ENOMEM => err::ENOMEM,
        libc::EINVAL => err::EINVAL,
        libc::ENOSPC | libc::EDQUOT => err::ENOSPC,
        libc::EOPNOTSUPP => err::ENOTSUP,
        _ => err::EIO,
    }
}

/// The server's first message.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// A client option's header: (option, payload length), checked.
pub fn parse_option_header(h: &[u8; 16]) -> Result<(u32, u32), String> {
    let magic = u64::from_be_bytes(h[..8].try_into().unwrap_or_default());
    if magic != IHAVEOPT {
        return Err(format!("bad option magic {magic:#x}"));
    }
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
    if len > MAX_OPTION_LEN {
        return Err(format!(
            "option {opt} of {len} bytes (at most {MAX_OPTION_LEN})"
        ));
    }
    Ok((opt, len))
}

/// An option reply.
pub fn option_reply(opt: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(20 + data.len());
    r.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    r.extend_from_slice(&opt.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    r
}

/// The export name and requested info items of an INFO/GO payload.
pub fn parse_info_request(p: &[u8]) -> Result<(String, Vec<u16>), String> {
    let n = p
        .get(..4)
        .map(|b| u32::from_be_bytes(b.try_into().unwrap_or_default()) as usize)
        .ok_or("truncated name length")?;
    if n > MAX_NAME {
        return Err(format!("export name of {n} bytes"));
    }
    let name = p.get(4..4 + n).ok_or("truncated export name")?;
    let name = std::str::from_utf8(name).map_err(|_| "export name is not UTF-8")?;
    let rest = &p[4 + n..];
    let count = rest
        .get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
        .ok_or("truncated info request count")?;
    let items = rest
        .get(2..2 + 2 * count)
        .ok_or("truncated info requests")?;
    if rest.len() != 2 + 2 * count {
        return Err("trailing bytes after the info requests".into());
    }
    Ok((
        name.to_string(),
        items
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// The INFO_EXPORT item: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// The INFO_BLOCK_SIZE item: 512-byte minimum, 4 KiB preferred, [`MAX_REQUEST`] max.
pub fn info_block_size() -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&512u32.to_be_bytes());
    d.extend_from_slice(&4096u32.to_be_bytes());
    d.extend_from_slice(&MAX_REQUEST.to_be_bytes());
    d
}

/// A transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub kind: u16,
    /// The client's cookie, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub len: u32,
}

/// Parse a 28-byte request header.
pub fn parse_request(h: &[u8; 28]) -> Result<Request, String> {
    let magic = u32::from_be_bytes(h[..4].try_into().unwrap_or_default());
    if magic != REQUEST_MAGIC {
        return Err(format!("bad request magic {magic:#x}"));
    }
    Ok(Request {
        flags: u16::from_be_bytes([h[4], h[5]]),
        kind: u16::from_be_bytes([h[6], h[7]]),
        handle: u64::from_be_bytes(h[8..16].try_into().unwrap_or_default()),
        offset: u64::from_be_bytes(h[16..24].try_into().unwrap_or_default()),
        len: u32::from_be_bytes(h[24..28].try_into().unwrap_or_default()),
    })
}

/// A simple reply's header.
pub fn simple_reply(handle: u64, error: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r[4..8].copy_from_slice(&error.to_be_bytes());
    r[8..].copy_from_slice(&handle.to_be_bytes());
    r
}

/// The export name and queries of a LIST/SET_META_CONTEXT payload.
pub fn parse_meta_request(p: &[u8]) -> Result<(String, Vec<String>), String> {
    let mut at = 0usize;
    let mut take = |n: usize, what: &str| -> Result<&[u8], String> {
        let b = p
            .get(at..at.saturating_add(n))
            .ok_or_else(|| format!("truncated {what}"))?;
        at += n;
        Ok(b)
    };
    let u32_at = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap_or_default()) as usize;
    let n = u32_at(take(4, "name length")?);
    if n > MAX_NAME {
        return Err(format!("export name of {n} bytes"));
    }
    let name = std::str::from_utf8(take(n, "export name")?)
        .map_err(|_| "export name is not UTF-8")?
        .to_string();
    let count = u32_at(take(4, "query count")?);
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = u32_at(take(4, "query length")?);
        if len > MAX_NAME {
            return Err(format!("query of {len} bytes"));
        }
        let q = std::str::from_utf8(take(len, "query")?).map_err(|_| "query is not UTF-8")?;
        queries.push(q.to_string());
    }
    if at != p.len() {
        return Err("trailing bytes after the queries".into());
    }
    Ok((name, queries))
}

/// The META_CONTEXT reply data: id and name.
pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut d = id.to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// A structured reply chunk's header.
pub fn structured_header(handle: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut r = [0u8; 20];
    r[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    r[4..6].copy_from_slice(&flags.to_be_bytes());
    r[6..8].copy_from_slice(&kind.to_be_bytes());
    r[8..16].copy_from_slice(&handle.to_be_bytes());
    r[16..].copy_from_slice(&len.to_be_bytes());
    r
}

/// The final chunk of a failed request: an error chunk without a message.
pub fn structured_error(handle: u64, error: u32) -> Vec<u8> {
    let mut r = structured_header(handle, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6).to_vec();
    r.extend_from_slice(&error.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r
}

/// The header of the one OFFSET_DATA chunk that answers a read of `len` bytes at
/// `offset` (the data follows it).
pub fn read_chunk_header(handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[..20].copy_from_slice(&structured_header(
        handle,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        len + 8,
    ));
    r[20..].copy_from_slice(&offset.to_be_bytes());
    r
}

/// The BLOCK_STATUS chunk of `base:allocation` for (length, zero) extents, each
/// at most `u32::MAX` bytes (a request's length bounds them).
pub fn block_status_chunk(handle: u64, extents: &[(u32, bool)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len() as u32;
    let mut r = structured_header(handle, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, len).to_vec();
    r.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for &(n, zero) in extents {
        r.extend_from_slice(&n.to_be_bytes());
        let flags = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
        r.extend_from_slice(&flags.to_be_bytes());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_headers_are_checked() {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        h[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        h[12..].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(parse_option_header(&h), Ok((OPT_GO, 10)));
        h[12..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option_header(&h).unwrap_err().contains("at most"));
        h[0] ^= 1;
        assert!(parse_option_header(&h).unwrap_err().contains("magic"));
    }

    #[test]
    fn info_requests_parse_and_hostile_ones_do_not() {
        let mut p = Vec::new();
        p.extend_from_slice(&2u32.to_be_bytes());
        p.extend_from_slice(b"vm");
        p.extend_from_slice(&1u16.to_be_bytes());
        p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&p),
            Ok(("vm".into(), vec![INFO_BLOCK_SIZE]))
        );
        // Every truncation, a name longer than the payload, a count beyond it.
        for n in 0..p.len() {
            assert!(parse_info_request(&p[..n]).is_err(), "{n}");
        }
        let mut long = p.clone();
        long[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&long).is_err());
        let mut many = p.clone();
        many[6..8].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(parse_info_request(&many).is_err());
        let mut trailing = p;
        trailing.push(0);
        assert!(parse_info_request(&trailing).is_err());
    }

    #[test]
    fn meta_context_requests_parse_and_hostile_ones_do_not() {
        let mut p = Vec::new();
        p.extend_from_slice(&2u32.to_be_bytes());
        p.extend_from_slice(b"vm");
        p.extend_from_slice(&2u32.to_be_bytes());
        for q in [&b"base:allocation"[..], b"qemu:dirty-bitmap:x"] {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q);
        }
        assert_eq!(
            parse_meta_request(&p),
            Ok((
                "vm".into(),
                vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()]
            ))
        );
        for n in 0..p.len() {
            assert!(parse_meta_request(&p[..n]).is_err(), "{n}");
        }
        let mut many = p.clone();
        many[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&many).is_err());
        let mut long = p.clone();
        long[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&long).is_err());
        p.push(0);
        assert!(parse_meta_request(&p).is_err());
    }

    #[test]
    fn structured_chunks_have_the_protocol_layout() {
        let e = structured_error(9, err::EIO);
        assert_eq!(e.len(), 26);
        assert_eq!(
            u32::from_be_bytes(e[..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC
        );
        assert_eq!(u16::from_be_bytes([e[4], e[5]]), REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([e[6], e[7]]), REPLY_TYPE_ERROR);
        assert_eq!(u64::from_be_bytes(e[8..16].try_into().unwrap()), 9);
        assert_eq!(u32::from_be_bytes(e[16..20].try_into().unwrap()), 6);
        assert_eq!(u32::from_be_bytes(e[20..24].try_into().unwrap()), err::EIO);
        let r = read_chunk_header(3, 4096, 512);
        assert_eq!(u32::from_be_bytes(r[16..20].try_into().unwrap()), 520);
        assert_eq!(u64::from_be_bytes(r[20..].try_into().unwrap()), 4096);
        let b = block_status_chunk(4, &[(4096, false), (8192, true)]);
        assert_eq!(b.len(), 20 + 4 + 16);
        assert_eq!(u32::from_be_bytes(b[16..20].try_into().unwrap()), 20);
        assert_eq!(
            u32::from_be_bytes(b[20..24].try_into().unwrap()),
            BASE_ALLOCATION_ID
        );
        assert_eq!(u32::from_be_bytes(b[28..32].try_into().unwrap()), 0);
        assert_eq!(u32::from_be_bytes(b[32..36].try_into().unwrap()), 8192);
        assert_eq!(u32::from_be_bytes(b[36..40].try_into().unwrap()), 3);
    }

    #[test]
    fn requests_and_replies_round_trip() {
        let mut h = [0u8; 28];
        h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        h[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        h[8..16].copy_from_slice(&0xdead_beefu64.to_be_bytes());
        h[16..24].copy_from_slice(&4096u64.to_be_bytes());
        h[24..].copy_from_slice(&512u32.to_be_bytes());
        let r = parse_request(&h).unwrap();
        assert_eq!(
            (r.kind, r.flags, r.handle, r.offset, r.len),
            (CMD_WRITE, 1, 0xdead_beef, 4096, 512)
        );
        h[3] ^= 1;
        assert!(parse_request(&h).is_err());
        let rep = simple_reply(7, err::EIO);
        assert_eq!(u32::from_be_bytes(rep[4..8].try_into().unwrap()), 5);
        assert_eq!(nbd_error(-libc::EROFS), err::EPERM);
        assert_eq!(nbd_error(-libc::EBADMSG), err::EIO);
        assert_eq!(nbd_error(512), 0);
    }
}
