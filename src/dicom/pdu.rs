//! PDU framing on a byte stream, with the announced length checked before the body is read.
//!
//! Owns: reading and writing whole PDUs (PS3.8 9.3) under a size cap, and the slack tolerated
//! over an announced Maximum Length. Must not know what the PDUs carry.

use dicom_ul::pdu::Pdu;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Slack over the announced Maximum Length tolerated in PDUs from peers (some peers count the
/// PDV item headers in it, some do not).
pub(crate) const PDU_SLACK: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("PDU of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("malformed PDU: {0}")]
    Malformed(String),
}

/// Reads one PDU, refusing any whose announced length exceeds `max_len`.
pub async fn read_pdu<R: AsyncRead + Unpin>(rd: &mut R, max_len: u32) -> Result<Pdu, PduError> {
    let mut header = [0u8; 6];
    match rd.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(PduError::Closed),
        Err(e) => return Err(PduError::Io(e)),
    }
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
    if len > max_len {
        return Err(PduError::TooLarge { len, max: max_len });
    }
    let mut buf = vec![0u8; 6 + len as usize];
    buf[..6].copy_from_slice(&header);
    rd.read_exact(&mut buf[6..]).await?;
    match dicom_ul::read_pdu(&buf[..], dicom_ul::pdu::MAXIMUM_PDU_SIZE, false) {
        Ok(Some(pdu)) => Ok(pdu),
        Ok(None) => Err(PduError::Malformed("truncated".into())),
        Err(e) => Err(PduError::Malformed(e.to_string())),
    }
}

/// Encodes PDUs into one buffer, so a message goes out in one write.
pub fn encode(pdus: &[Pdu]) -> Result<Vec<u8>, PduError> {
    let mut out = Vec::new();
    for p in pdus {
        dicom_ul::write_pdu(&mut out, p).map_err(|e| PduError::Malformed(e.to_string()))?;
    }
    Ok(out)
}

pub async fn write_pdu(w: &mut (impl AsyncWriteExt + Unpin), pdu: &Pdu) -> Result<(), PduError> {
    let bytes = encode(std::slice::from_ref(pdu))?;
    w.write_all(&bytes).await?;
    // A TLS stream may hold the last records until flushed (a TCP stream has nothing to do).
    w.flush().await?;
    Ok(())
}
