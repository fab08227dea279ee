//! pacsgate: a SMART-on-FHIR authorization gateway in front of a PACS.
//!
//! Front ends ([`dimse`], [`web`]) translate their protocol into actions; the [`trust`] core turns
//! tokens into principals; the [`policy`] core is the one place that allows or denies; [`pacs`]
//! talks to the upstream PACS under the gateway's own identity; [`audit`] records decisions.

pub mod audit;
pub mod authority;
pub mod config;
#[cfg(test)]
mod conformance_tests;
pub mod crypto;
pub mod devissuer;
pub mod dicom;
pub mod dimse;
pub mod ehr;
pub mod generation;
pub mod logtext;
pub mod metrics;
pub mod pacs;
pub mod policy;
pub mod readiness;
pub mod server;
pub mod tls;
pub mod trust;
pub mod web;
