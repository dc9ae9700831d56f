//! TLS for the NBD frontend (`NBD_OPT_STARTTLS`, rustls): a VM's whole disk should
//! not cross a network in clear.
//!
//! **Modes** (the protocol's names): on TCP a server with a certificate is in
//! FORCEDTLS mode — every option but STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD`
//! until TLS is up, so no export is listed, described or opened in clear; on the
//! Unix socket (0600, local root only) TLS is offered, not required.
//!
//! **Who may use what**: with `--tls-client-ca` a client must present a certificate
//! issued by that CA (TLS 1.2/1.3 mutual authentication); `--tls-allow
//! EXPORT=NAME,…` then lets only clients whose certificate is valid for one of the
//! NAMEs (its subjectAltName DNS names, checked by webpki) list or open EXPORT.
//! Exports without an allow-list are open to every client the CA vouches for.
//!
//! **Shape**: after STARTTLS's ACK, [`accept`] runs the TLS handshake on the
//! connection's socket (bounded by the handshake deadline already set on it), then
//! hands the session to a relay thread that moves records between the socket and
//! one end of a Unix socket pair, both non-blocking, under `poll(2)`. The server
//! goes on with the other end as a plain [`Conn`]: the reader/writer split of a
//! connection, its deadlines and its back-pressure work unchanged, at the cost of
//! one copy of the plaintext through the pair.

use super::Conn;
use crate::error::{Error, IoContext, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What `livemount serve` was given for TLS.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM; not readable by group or others).
    pub key: PathBuf,
    /// CA whose certificates clients must present (None: no client certificates).
    pub client_ca: Option<PathBuf>,
    /// Per export, the names a client certificate must be valid for.
    pub allow: Vec<(String, Vec<String>)>,
}

/// The server side of TLS, loaded and checked once at start.
pub struct TlsServer {
    config: Arc<ServerConfig>,
    allow: BTreeMap<String, Vec<String>>,
}

fn pem_error(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: not a PEM {what}: {e}", path.display()))
}

impl TlsServer {
    /// Load certificate, key and client CA; every error names its file.
    pub fn load(o: &TlsOptions) -> Result<TlsServer> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&o.cert)
            .map_err(|e| pem_error(&o.cert, "certificate", e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| pem_error(&o.cert, "certificate", e))?;
        if chain.is_empty() {
            return Err(pem_error(&o.cert, "certificate", "no CERTIFICATE block"));
        }
        let mode = std::fs::metadata(&o.key).at(&o.key)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(Error::Invalid(format!(
                "{}: the TLS key is readable by group or others (mode {:o}); chmod 600 it",
                o.key.display(),
                mode & 0o777
            )));
        }
        let key = PrivateKeyDer::from_pem_file(&o.key)
            .map_err(|e| pem_error(&o.key, "private key", e))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Invalid(format!("TLS: {e}")))?;
        let builder = match &o.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).map_err(|e| pem_error(ca, "CA", e))? {
                    let c = c.map_err(|e| pem_error(ca, "CA", e))?;
                    roots
                        .add(c)
                        .map_err(|e| Error::Invalid(format!("{}: {e}", ca.display())))?;
                }
                if roots.is_empty() {
                    return Err(pem_error(ca, "CA", "no CERTIFICATE block"));
                }
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| Error::Invalid(format!("{}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(v)
            }
            None => {
                if !o.allow.is_empty() {
                    return Err(Error::Invalid(
                        "--tls-allow needs --tls-client-ca (clients are known by their certificates)"
                            .into(),
                    ));
                }
                builder.with_no_client_auth()
            }
        };
        let config = builder.with_single_cert(chain, key).map_err(|e| {
            Error::Invalid(format!("{} / {}: {e}", o.cert.display(), o.key.display()))
        })?;
        for (_, names) in &o.allow {
            for n in names {
                ServerName::try_from(n.as_str())
                    .map_err(|_| Error::Invalid(format!("--tls-allow: {n:?} is not a DNS name")))?;
            }
        }
        Ok(TlsServer {
            config: Arc::new(config),
            allow: o.allow.iter().cloned().collect(),
        })
    }

    /// Whether a client may list and open `export`: `peer` is its certificate
    /// (None: a client in clear, which only the local Unix socket admits).
    pub fn allows(&self, peer: Option<&CertificateDer<'static>>, export: &str) -> bool {
        let (Some(names), Some(cert)) = (self.allow.get(export), peer) else {
            return true;
        };
        let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
            return false;
        };
        names.iter().any(|n| {
            ServerName::try_from(n.as_str())
                .is_ok_and(|sn| ee.verify_is_valid_for_subject_name(&sn).is_ok())
        })
    }
}

/// The TLS handshake on `c`'s socket (after STARTTLS's ACK), then a plain
/// connection relayed through it, and the client's certificate if it sent one.
pub fn accept(
    c: &dyn Conn,
    tls: &TlsServer,
) -> io::Result<(Box<dyn Conn>, Option<CertificateDer<'static>>)> {
    let mut sock = File::from(c.socket_fd()?);
    let mut session = ServerConnection::new(tls.config.clone()).map_err(io::Error::other)?;
    while session.is_handshaking() {
        session.complete_io(&mut sock)?;
    }
    let peer = session
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    let (mine, theirs) = UnixStream::pair()?;
    std::thread::Builder::new()
        .name("nbd-tls".into())
        .spawn(move || relay(sock, session, mine))?;
    Ok((Box::new(theirs), peer))
}

/// Plaintext buffered for the server before the relay stops reading the client.
const PLAIN_BUFFER: usize = 1 << 20;

fn nonblocking(f: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Move TLS records between `sock` and plaintext on `plain` until either side is
/// done. Ending drops both: the server sees EOF, the client a closed socket.
// One poll loop on purpose (~120 lines): both directions share the TLS session's
// buffers and the poll set, and each step depends on what the other left pending.
fn relay(sock: File, mut tls: ServerConnection, plain: UnixStream) {
    if nonblocking(&sock).is_err() || plain.set_nonblocking(true).is_err() {
        return;
    }
    let mut to_plain: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    // The client sent close_notify or closed; the server closed its end.
    let (mut client_done, mut server_done) = (false, false);
    // Records read during the handshake may already hold the first options.
    let mut fresh_records = true;
    loop {
        if fresh_records {
            fresh_records = false;
            if tls.process_new_packets().is_err() {
                let _ = tls.write_tls(&mut &sock);
                return;
            }
            loop {
                match tls.reader().read(&mut buf) {
                    Ok(0) => {
                        client_done = true;
                        break;
                    }
                    Ok(n) => to_plain.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        client_done = true;
                        break;
                    }
                }
            }
        }
        while tls.wants_write() {
            match tls.write_tls(&mut &sock) {
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(_) => return,
            }
        }
        while !to_plain.is_empty() {
            match (&plain).write(&to_plain) {
                Ok(n) => drop(to_plain.drain(..n)),
                Err(e) if would_block(&e) => break,
                Err(_) => return,
            }
        }
        if (server_done && !tls.wants_write()) || (client_done && to_plain.is_empty()) {
            return;
        }
        let mut fds = [
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: 0,
                revents: 0,
            },
            libc::pollfd {
                fd: plain.as_raw_fd(),
                events: 0,
                revents: 0,
            },
        ];
        if !client_done && to_plain.len() < PLAIN_BUFFER {
            fds[0].events |= libc::POLLIN;
        }
        if tls.wants_write() {
            fds[0].events |= libc::POLLOUT;
        }
        // Plaintext from the server only as fast as the client takes records.
        if !server_done && !tls.wants_write() {
            fds[1].events |= libc::POLLIN;
        }
        if !to_plain.is_empty() {
            fds[1].events |= libc::POLLOUT;
        }
        // SAFETY: two initialized pollfd entries, the length passed with them.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        let ready = |p: &libc::pollfd| {
            p.events & libc::POLLIN != 0
                && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
        };
        if ready(&fds[0]) {
            match tls.read_tls(&mut &sock) {
                Ok(0) => client_done = true,
                Ok(_) => fresh_records = true,
                Err(e) if would_block(&e) => {}
                Err(_) => return,
            }
        }
        if ready(&fds[1]) {
            match (&plain).read(&mut buf) {
                Ok(0) => {
                    tls.send_close_notify();
                    server_done = true;
                }
                Ok(n) => {
                    if tls.writer().write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(e) if would_block(&e) => {}
                Err(_) => {
                    tls.send_close_notify();
                    server_done = true;
                }
            }
        }
        // A socket whose client is gone and that nobody polls for reading anymore
        // (its buffer full) must still end the relay.
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 && !ready(&fds[0]) {
            return;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::frontend::nbd::proto::*;
    use crate::frontend::nbd::tests::{
        chunk, go_only, hello, option, read_reply, request, striped,
    };
    use crate::frontend::nbd::{serve_connection, Budget, ListenerTls};
    use livemount_store::workers::Pool;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use std::os::unix::fs::PermissionsExt;

    /// A CA, and certificates it issues, written as PEM files in a temporary dir.
    pub(crate) struct Pki {
        pub dir: tempfile::TempDir,
        ca: rcgen::Certificate,
        ca_key: KeyPair,
    }

    impl Pki {
        pub fn new() -> Pki {
            let ca_key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = p.self_signed(&ca_key).unwrap();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
            Pki { dir, ca, ca_key }
        }

        /// (certificate, key) files of `name`, issued by the CA.
        pub fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .signed_by(&key, &self.ca, &self.ca_key)
                .unwrap();
            let (c, k) = (
                self.dir.path().join(format!("{name}.pem")),
                self.dir.path().join(format!("{name}.key")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
            (c, k)
        }

        pub fn ca(&self) -> PathBuf {
            self.dir.path().join("ca.pem")
        }
    }

    /// A server with a certificate for `localhost` and no client certificates.
    pub(crate) fn server() -> TlsServer {
        let pki = Pki::new();
        let (cert, key) = pki.issue("localhost");
        TlsServer::load(&TlsOptions {
            cert,
            key,
            ..Default::default()
        })
        .unwrap()
    }

    fn client_config(pki: &Pki, who: Option<&str>) -> Arc<rustls::ClientConfig> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(pki.ca()).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        Arc::new(match who {
            Some(name) => {
                let (c, k) = pki.issue(name);
                let chain = CertificateDer::pem_file_iter(c)
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect();
                b.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(k).unwrap())
                    .unwrap()
            }
            None => b.with_no_client_auth(),
        })
    }

    /// Connect as `who` to a TLS-only server of "vm" (allowed for hv1 only) and
    /// "other" (any client of the CA): the stream after STARTTLS, or None if the
    /// TLS handshake failed.
    fn connect(
        who: Option<&str>,
    ) -> (
        Option<rustls::StreamOwned<rustls::ClientConnection, UnixStream>>,
        std::thread::JoinHandle<io::Result<()>>,
    ) {
        let pki = Pki::new();
        let (cert, key) = pki.issue("localhost");
        let server = TlsServer::load(&TlsOptions {
            cert,
            key,
            client_ca: Some(pki.ca()),
            allow: vec![("vm".into(), vec!["hv1.test".into()])],
        })
        .unwrap();
        let mut e = striped();
        let other = striped().remove("vm").unwrap();
        e.insert("other".into(), other);
        let lt = ListenerTls {
            server: Some(Arc::new(server)),
            required: true,
        };
        let (mut c, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            serve_connection(
                Box::new(b),
                &e,
                &lt,
                &Pool::new("test-io", 1),
                &Budget::new(1 << 20),
            )
        });
        hello(&mut c);
        option(&mut c, OPT_STARTTLS, &[]);
        assert_eq!(read_reply(&mut c).1, REP_ACK);
        let conn = rustls::ClientConnection::new(
            client_config(&pki, who),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut s = rustls::StreamOwned::new(conn, c);
        // The handshake completes (or fails) on first use.
        while s.conn.is_handshaking() {
            if s.conn.complete_io(&mut s.sock).is_err() {
                return (None, t);
            }
        }
        (Some(s), t)
    }

    fn list(s: &mut (impl Read + Write)) -> Vec<String> {
        option(s, OPT_LIST, &[]);
        let mut names = Vec::new();
        loop {
            let (_, kind, d) = read_reply(s);
            if kind != REP_SERVER {
                assert_eq!(kind, REP_ACK);
                return names;
            }
            names.push(String::from_utf8(d[4..].to_vec()).unwrap());
        }
    }

    #[test]
    fn a_tls_client_is_served_through_the_relay_within_its_allow_list() {
        let (s, t) = connect(Some("hv2.test"));
        let mut s = s.expect("handshake");
        // Under TLS: options work, and hv2 sees only what it may open.
        assert_eq!(list(&mut s), vec!["other".to_string()]);
        option(&mut s, OPT_STARTTLS, &[]);
        assert_eq!(read_reply(&mut s).1, REP_ERR_INVALID, "TLS twice");
        assert_eq!(go_only(&mut s, "vm"), REP_ERR_POLICY);
        option(&mut s, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(read_reply(&mut s).1, REP_ACK);
        assert_eq!(go_only(&mut s, "other"), REP_ACK);
        // Many requests in flight through the relay, large replies.
        for h in 0..32u64 {
            request(&mut s, CMD_READ, h, h * 32768, 32768, &[]);
        }
        for _ in 0..32 {
            let (_, kind, h, d) = chunk(&mut s);
            assert_eq!(kind, REPLY_TYPE_OFFSET_DATA);
            let at = h * 32768;
            assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), at);
            assert!(d[8..]
                .iter()
                .enumerate()
                .all(|(i, &b)| b == ((at + i as u64) % 251) as u8));
        }
        request(&mut s, CMD_DISC, 99, 0, 0, &[]);
        s.flush().unwrap();
        t.join().unwrap().unwrap();
        // hv1 may open vm.
        let (s, t) = connect(Some("hv1.test"));
        let mut s = s.expect("handshake");
        assert_eq!(list(&mut s), vec!["other".to_string(), "vm".to_string()]);
        assert_eq!(go_only(&mut s, "vm"), REP_ACK);
        drop(s);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn a_client_without_a_certificate_is_refused_in_the_handshake() {
        let (s, t) = connect(None);
        // Under TLS 1.3 the client finishes its side before the server checks it:
        // the refusal is the next read failing (an alert or a closed socket).
        if let Some(mut s) = s {
            let mut m = IHAVEOPT.to_be_bytes().to_vec();
            m.extend_from_slice(&OPT_LIST.to_be_bytes());
            m.extend_from_slice(&0u32.to_be_bytes());
            let _ = s.write_all(&m).and_then(|()| s.flush());
            let mut h = [0u8; 20];
            assert!(
                s.read_exact(&mut h).is_err(),
                "served without a certificate"
            );
        }
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn keys_readable_by_others_and_files_that_are_not_pem_are_refused() {
        let pki = Pki::new();
        let (cert, key) = pki.issue("localhost");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let o = TlsOptions {
            cert: cert.clone(),
            key: key.clone(),
            ..Default::default()
        };
        let refused = |o: TlsOptions| match TlsServer::load(&o) {
            Ok(_) => panic!("{o:?} was accepted"),
            Err(e) => e.to_string(),
        };
        let e = refused(o.clone());
        assert!(
            e.contains("chmod 600") && e.contains(key.to_str().unwrap()),
            "{e}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let junk = pki.dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = refused(TlsOptions {
            cert: junk.clone(),
            ..o.clone()
        });
        assert!(e.contains("junk.pem"), "{e}");
        let e = refused(TlsOptions {
            allow: vec![("vm".into(), vec!["a".into()])],
            ..o.clone()
        });
        assert!(e.contains("--tls-client-ca"), "{e}");
        // A CA file that is no certificate; an allow-list name that is no DNS name.
        let e = refused(TlsOptions {
            client_ca: Some(junk),
            ..o.clone()
        });
        assert!(e.contains("junk.pem"), "{e}");
        let e = refused(TlsOptions {
            client_ca: Some(pki.ca()),
            allow: vec![("vm".into(), vec!["not a name!".into()])],
            ..o
        });
        assert!(e.contains("not a name!"), "{e}");
    }
}
