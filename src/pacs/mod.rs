//! The upstream: everything the gateway asks of the PACS, under its own identity.
//!
//! Owns: opening a DIMSE association to the PACS (connect with a timeout, TCP_NODELAY, send the
//! A-ASSOCIATE-RQ, read the answer with a size cap and a timeout), the pooled ownership look-ups
//! the policy core's [`crate::policy::OwnerLookup`] port is served by ([`lookup`]), and the
//! DICOMweb client the DICOMweb front end relays through ([`dicomweb`]). Must not know tokens
//! (the caller's token never goes upstream) and no front end: it uses the wire layer
//! ([`crate::dicom`]) only.

pub mod dicomweb;
pub mod dimse;
pub mod echo;
pub mod lookup;
pub(crate) mod pool;

pub use lookup::PacsLookup;
pub use pool::{Slot, Slots};

use crate::config::Pacs;
use crate::dicom::pdu::{PduError, read_pdu, write_pdu};
use crate::dicom::peer::Stream;
use dicom_ul::pdu::{AssociationAC, AssociationRJ, AssociationRQ, Pdu};
use std::time::Duration;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the PACS at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the PACS did not answer the association request within {0:?}")]
    Timeout(Duration),
    #[error("the PACS rejected the association: {0:?}")]
    Rejected(AssociationRJ),
    #[error("the PACS answered with {0}")]
    Unexpected(String),
    #[error("association with the PACS failed: {0}")]
    Pdu(#[from] PduError),
    /// The TLS handshake failed: most often a certificate that does not verify. Never a
    /// reason to try plaintext.
    #[error("TLS with the PACS at {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
}

/// The largest A-ASSOCIATE-AC accepted from the PACS.
const MAX_AC_BYTES: u32 = 256 * 1024;

/// Opens an association to the PACS with `rq`; returns the connection and the PACS's answer.
pub async fn associate(
    pacs: &Pacs,
    rq: AssociationRQ,
    answer_timeout: Duration,
) -> Result<(Stream, AssociationAC), UpstreamError> {
    let connect =
        tokio::time::timeout(pacs.connect_timeout, TcpStream::connect(&pacs.address)).await;
    let stream = match connect {
        Err(_) => {
            return Err(UpstreamError::Connect {
                addr: pacs.address.clone(),
                reason: format!("no answer within {:?}", pacs.connect_timeout),
            });
        }
        Ok(Err(e)) => {
            return Err(UpstreamError::Connect {
                addr: pacs.address.clone(),
                reason: e.to_string(),
            });
        }
        Ok(Ok(s)) => s,
    };
    // Without it every DIMSE exchange waits for delayed ACKs (about 40 ms on Linux).
    let _ = stream.set_nodelay(true);
    let mut stream = match &pacs.dimse_tls {
        None => Stream::Plain(stream),
        Some(tls) => {
            let tls_error = |reason: String| UpstreamError::Tls {
                addr: pacs.address.clone(),
                reason,
            };
            match tokio::time::timeout(pacs.connect_timeout, tls.connect(stream)).await {
                Ok(Ok(s)) => Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(s))),
                Ok(Err(e)) => return Err(tls_error(e.to_string())),
                Err(_) => {
                    return Err(tls_error(format!(
                        "no handshake within {:?}",
                        pacs.connect_timeout
                    )));
                }
            }
        }
    };
    write_pdu(&mut stream, &Pdu::AssociationRQ(rq)).await?;
    let answer = tokio::time::timeout(answer_timeout, read_pdu(&mut stream, MAX_AC_BYTES))
        .await
        .map_err(|_| UpstreamError::Timeout(answer_timeout))??;
    match answer {
        Pdu::AssociationAC(ac) => Ok((stream, ac)),
        Pdu::AssociationRJ(rj) => Err(UpstreamError::Rejected(rj)),
        other => Err(UpstreamError::Unexpected(
            other.short_description().to_string(),
        )),
    }
}
