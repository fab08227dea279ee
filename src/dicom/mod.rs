//! The DICOM wire layer both front ends and the PACS client share.
//!
//! Owns: the strict reader ([`reader`]) and everything read through it: command sets
//! ([`command`]), small data sets read whole ([`dataset`]), instances read as they stream
//! ([`head`]), the values decisions are made on ([`values`]) and the transfer syntaxes the
//! reader decodes ([`syntax`]). Every byte a peer sends that the gateway judges or relays is
//! read here once, by one bounded reader; what goes on is either re-encoded from what was
//! read or bytes this reader proved unambiguous. Must not know tokens, policy or protocols
//! above DIMSE messages.

pub mod command;
pub mod dataset;
pub mod head;
pub mod message;
pub mod negotiation;
pub mod pdu;
pub mod peer;
pub mod reader;
pub mod syntax;
pub mod values;

#[cfg(test)]
mod tests;
