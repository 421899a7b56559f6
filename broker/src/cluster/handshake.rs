//! Mutual authentication of two nodes with the cluster secret, which never crosses the wire.
//!
//! ```text
//! dialer                                   acceptor
//!   Hello{node, advertise, nonce_d}  ──►
//!                                    ◄──   Hello{node, advertise, nonce_a}
//!                                    ◄──   Proof(HMAC(secret, "acceptor" | hello_d | hello_a))
//!   Proof(HMAC(secret, "dialer" | hello_d | hello_a)) ──►
//!                                    ◄──   Accepted | Refused(reason)
//! ```
//!
//! Each side proves it knows the secret over both fresh nonces, so a recorded proof is useless
//! on another link, and the roles are in the MAC, so one side's proof cannot be reflected back
//! as the other's. A node that fails the check is told why (`Refused`) and the refusal is
//! logged on both sides with the peer's name and address, so a misconfigured secret is
//! visible at once instead of as a node that silently never joins.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use super::link::{read_frame, write_frame};
use super::wire::{Frame, Hello, PROTOCOL, WireError};

/// Who this node is, for handshakes.
#[derive(Clone)]
pub struct Identity {
    pub node: String,
    pub advertise: String,
    pub incarnation: u64,
    pub secret: std::sync::Arc<[u8]>,
    /// TLS on the links (`cluster-tls`), or plain TCP.
    pub tls: Option<std::sync::Arc<crate::tls::ClusterTls>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("node {node} does not know this cluster's secret; refused")]
    WrongSecret { node: String },
    #[error("refused by {node}: {reason}")]
    Refused { node: String, reason: String },
    #[error("node {node} speaks inter-node protocol {theirs}, this node {ours}")]
    Protocol {
        node: String,
        theirs: u32,
        ours: u32,
    },
    #[error("unexpected frame during the handshake: {0}")]
    Unexpected(String),
    #[error("this address is this node itself")]
    OwnAddress,
    #[error("node {node} refused: {reason}")]
    NotAdmitted { node: String, reason: String },
}

fn nonce() -> [u8; 32] {
    rand::random()
}

fn mac(secret: &[u8], role: &[u8], dialer: &Hello, acceptor: &Hello) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(role);
    for hello in [dialer, acceptor] {
        // Encoding a plain struct into a Vec cannot fail.
        mac.update(&super::wire::to_body(hello).unwrap_or_default());
    }
    mac
}

fn proof(secret: &[u8], role: &[u8], dialer: &Hello, acceptor: &Hello) -> [u8; 32] {
    mac(secret, role, dialer, acceptor)
        .finalize()
        .into_bytes()
        .into()
}

/// Constant-time comparison (`verify_slice`).
fn verify(secret: &[u8], role: &[u8], dialer: &Hello, acceptor: &Hello, got: &[u8; 32]) -> bool {
    mac(secret, role, dialer, acceptor)
        .verify_slice(got)
        .is_ok()
}

fn hello(me: &Identity) -> Hello {
    Hello {
        protocol: PROTOCOL,
        node: me.node.clone(),
        advertise: me.advertise.clone(),
        incarnation: me.incarnation,
        nonce: nonce(),
    }
}

async fn expect_hello<S: AsyncRead + Unpin>(s: &mut S) -> Result<Hello, HandshakeError> {
    match read_frame(s).await? {
        Frame::Hello(h) => Ok(h),
        Frame::Refused(reason) => Err(HandshakeError::Refused {
            node: "peer".into(),
            reason,
        }),
        other => Err(HandshakeError::Unexpected(format!("{other:?}"))),
    }
}

/// The dialling side; returns the peer's hello once both proofs checked out.
pub async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    me: &Identity,
) -> Result<Hello, HandshakeError> {
    let mine = hello(me);
    write_frame(s, &Frame::Hello(mine.clone())).await?;
    let theirs = expect_hello(s).await?;
    if theirs.node == me.node {
        return Err(HandshakeError::OwnAddress);
    }
    let Frame::Proof(p) = read_frame(s).await? else {
        return Err(HandshakeError::Unexpected(
            "no proof from the acceptor".into(),
        ));
    };
    if theirs.protocol != PROTOCOL {
        return Err(HandshakeError::Protocol {
            node: theirs.node,
            theirs: theirs.protocol,
            ours: PROTOCOL,
        });
    }
    if !verify(&me.secret, b"acceptor", &mine, &theirs, &p) {
        let _ = write_frame(
            s,
            &Frame::Refused(format!(
                "{} could not verify your proof: the cluster secrets differ",
                me.node
            )),
        )
        .await;
        return Err(HandshakeError::WrongSecret { node: theirs.node });
    }
    write_frame(
        s,
        &Frame::Proof(proof(&me.secret, b"dialer", &mine, &theirs)),
    )
    .await?;
    match read_frame(s).await? {
        Frame::Accepted => Ok(theirs),
        Frame::Refused(reason) => Err(HandshakeError::Refused {
            node: theirs.node,
            reason,
        }),
        other => Err(HandshakeError::Unexpected(format!("{other:?}"))),
    }
}

/// The accepting side; returns the peer's hello once both proofs checked out and `admit`
/// let it in (its `Err` is sent to the peer as the reason it is refused).
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    me: &Identity,
    admit: impl FnOnce(&Hello) -> Result<(), String>,
) -> Result<Hello, HandshakeError> {
    let theirs = expect_hello(s).await?;
    let mine = hello(me);
    write_frame(s, &Frame::Hello(mine.clone())).await?;
    if theirs.node == me.node {
        return Err(HandshakeError::OwnAddress);
    }
    write_frame(
        s,
        &Frame::Proof(proof(&me.secret, b"acceptor", &theirs, &mine)),
    )
    .await?;
    if theirs.protocol != PROTOCOL {
        let e = HandshakeError::Protocol {
            node: theirs.node,
            theirs: theirs.protocol,
            ours: PROTOCOL,
        };
        let _ = write_frame(s, &Frame::Refused(e.to_string())).await;
        return Err(e);
    }
    let p = match read_frame(s).await? {
        Frame::Proof(p) => p,
        Frame::Refused(reason) => {
            return Err(HandshakeError::Refused {
                node: theirs.node,
                reason,
            });
        }
        other => return Err(HandshakeError::Unexpected(format!("{other:?}"))),
    };
    if !verify(&me.secret, b"dialer", &theirs, &mine, &p) {
        let _ = write_frame(
            s,
            &Frame::Refused(format!(
                "{} refused the link: wrong cluster secret",
                me.node
            )),
        )
        .await;
        return Err(HandshakeError::WrongSecret { node: theirs.node });
    }
    if let Err(reason) = admit(&theirs) {
        let _ = write_frame(s, &Frame::Refused(reason.clone())).await;
        return Err(HandshakeError::NotAdmitted {
            node: theirs.node,
            reason,
        });
    }
    write_frame(s, &Frame::Accepted).await?;
    Ok(theirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(node: &str, secret: &[u8]) -> Identity {
        Identity {
            node: node.into(),
            advertise: format!("{node}:25672"),
            incarnation: 7,
            secret: secret.into(),
            tls: None,
        }
    }

    async fn run(
        d: Identity,
        a: Identity,
    ) -> (Result<Hello, HandshakeError>, Result<Hello, HandshakeError>) {
        let (mut x, mut y) = tokio::io::duplex(4096);
        tokio::join!(dial(&mut x, &d), accept(&mut y, &a, |_| Ok(())))
    }

    #[tokio::test]
    async fn same_secret_links_and_names_the_peer() {
        let (d, a) = run(id("warren@a", b"s3cret"), id("warren@b", b"s3cret")).await;
        assert_eq!(d.expect("dialer").node, "warren@b");
        assert_eq!(a.expect("acceptor").node, "warren@a");
    }

    #[tokio::test]
    async fn a_wrong_secret_is_refused_on_both_sides() {
        let (d, a) = run(id("warren@a", b"s3cret"), id("warren@b", b"other")).await;
        assert!(
            matches!(d, Err(HandshakeError::WrongSecret { ref node }) if node == "warren@b"),
            "{d:?}"
        );
        // The acceptor proved itself first; the dialer refused it and said why.
        assert!(
            matches!(a, Err(HandshakeError::Refused { ref reason, .. }) if reason.contains("secrets differ")),
            "{a:?}"
        );
    }

    #[tokio::test]
    async fn a_node_the_acceptor_does_not_admit_is_told_why() {
        let (mut x, mut y) = tokio::io::duplex(4096);
        let (me_a, me_b) = (id("warren@a", b"s"), id("warren@b", b"s"));
        let (d, a) = tokio::join!(
            dial(&mut x, &me_a),
            accept(&mut y, &me_b, |h| Err(format!("{} was forgotten", h.node)))
        );
        assert!(
            matches!(d, Err(HandshakeError::Refused { ref reason, .. }) if reason == "warren@a was forgotten"),
            "{d:?}"
        );
        assert!(
            matches!(a, Err(HandshakeError::NotAdmitted { .. })),
            "{a:?}"
        );
    }

    #[tokio::test]
    async fn dialling_itself_is_recognised() {
        let (d, a) = run(id("warren@a", b"s"), id("warren@a", b"s")).await;
        assert!(matches!(d, Err(HandshakeError::OwnAddress)));
        assert!(matches!(a, Err(HandshakeError::OwnAddress)));
    }

    #[test]
    fn proofs_depend_on_role_and_nonces() {
        let h = |n: u8| Hello {
            protocol: PROTOCOL,
            node: "n".into(),
            advertise: "a".into(),
            incarnation: 1,
            nonce: [n; 32],
        };
        let p = proof(b"k", b"dialer", &h(1), &h(2));
        assert!(verify(b"k", b"dialer", &h(1), &h(2), &p));
        assert!(!verify(b"k", b"acceptor", &h(1), &h(2), &p));
        assert!(!verify(b"k", b"dialer", &h(1), &h(3), &p));
        assert!(!verify(b"x", b"dialer", &h(1), &h(2), &p));
    }
}
