//! DIMSE services the gateway asks of the PACS under its own identity, for DICOMweb served by
//! translation (a PACS without a DICOMweb service): C-FIND with its matches collected, C-GET
//! (or, for a PACS without it, C-MOVE to the gateway's own receiver, routed back through the
//! C-MOVE registry) with the instances streamed out as they arrive, C-STORE with an instance
//! streamed in.
//!
//! Owns: the associations these operations run on (the presentation contexts each proposes,
//! how many are open at once), the DIMSE exchange of each, and the bounds on what the PACS may
//! send (matches, bytes, waits). Every match is read by the strict reader here; instances are
//! passed on fragment by fragment, unread, for the caller's strict reader to judge as they
//! stream. Must not know HTTP, DICOM JSON, tokens or policy.

use super::associate;
use crate::config::Pacs;
use crate::dicom::command::{self, Command};
use crate::dicom::dataset::{DataSet, encode_element};
use crate::dicom::message::Event;
use crate::dicom::peer::{Incoming, Peer};
use crate::dicom::reader::{Encoding, Limits};
use crate::dicom::syntax::{self, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN};
use bytes::Bytes;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_ul::pdu::{
    AssociationAC, AssociationRQ, PresentationContextProposed, PresentationContextResultReason,
    RequestorRoles, UserVariableItem,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";
const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";

/// The storage SOP classes a retrieval proposes to receive (the SCP role, PS3.7 D.3.3.4). A
/// presentation context is one odd id below 256: at most 127 per association, one of them
/// the retrieval's own, so the list is the standard classes a PACS holds for viewers (image,
/// waveform, structured report, document, presentation state, RT). An instance of a class not
/// listed cannot be retrieved by translation (the PACS fails its sub-operation).
pub(crate) const STORAGE_CLASSES: &[&str] = &[
    "1.2.840.10008.5.1.4.1.1.1",        // Computed Radiography
    "1.2.840.10008.5.1.4.1.1.1.1",      // Digital X-Ray (presentation)
    "1.2.840.10008.5.1.4.1.1.1.1.1",    // Digital X-Ray (processing)
    "1.2.840.10008.5.1.4.1.1.1.2",      // Digital Mammography (presentation)
    "1.2.840.10008.5.1.4.1.1.1.2.1",    // Digital Mammography (processing)
    "1.2.840.10008.5.1.4.1.1.1.3",      // Digital Intra-Oral X-Ray (presentation)
    "1.2.840.10008.5.1.4.1.1.1.3.1",    // Digital Intra-Oral X-Ray (processing)
    "1.2.840.10008.5.1.4.1.1.2",        // CT
    "1.2.840.10008.5.1.4.1.1.2.1",      // Enhanced CT
    "1.2.840.10008.5.1.4.1.1.2.2",      // Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.3.1",      // Ultrasound Multi-frame
    "1.2.840.10008.5.1.4.1.1.4",        // MR
    "1.2.840.10008.5.1.4.1.1.4.1",      // Enhanced MR
    "1.2.840.10008.5.1.4.1.1.4.2",      // MR Spectroscopy
    "1.2.840.10008.5.1.4.1.1.4.3",      // Enhanced MR Color
    "1.2.840.10008.5.1.4.1.1.4.4",      // Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.6.1",      // Ultrasound
    "1.2.840.10008.5.1.4.1.1.6.2",      // Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.7",        // Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.1",      // Multi-frame Single Bit SC
    "1.2.840.10008.5.1.4.1.1.7.2",      // Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",      // Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",      // Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.9.1.1",    // 12-lead ECG
    "1.2.840.10008.5.1.4.1.1.9.1.2",    // General ECG
    "1.2.840.10008.5.1.4.1.1.9.1.3",    // Ambulatory ECG
    "1.2.840.10008.5.1.4.1.1.9.2.1",    // Hemodynamic Waveform
    "1.2.840.10008.5.1.4.1.1.9.3.1",    // Cardiac Electrophysiology Waveform
    "1.2.840.10008.5.1.4.1.1.9.4.1",    // Basic Voice Audio Waveform
    "1.2.840.10008.5.1.4.1.1.9.4.2",    // General Audio Waveform
    "1.2.840.10008.5.1.4.1.1.9.5.1",    // Arterial Pulse Waveform
    "1.2.840.10008.5.1.4.1.1.9.6.1",    // Respiratory Waveform
    "1.2.840.10008.5.1.4.1.1.11.1",     // Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.11.2",     // Color Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.11.3",     // Pseudo-Color Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.11.4",     // Blending Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.12.1",     // X-Ray Angiographic
    "1.2.840.10008.5.1.4.1.1.12.1.1",   // Enhanced XA
    "1.2.840.10008.5.1.4.1.1.12.2",     // X-Ray Radiofluoroscopic
    "1.2.840.10008.5.1.4.1.1.12.2.1",   // Enhanced XRF
    "1.2.840.10008.5.1.4.1.1.13.1.1",   // X-Ray 3D Angiographic
    "1.2.840.10008.5.1.4.1.1.13.1.2",   // X-Ray 3D Craniofacial
    "1.2.840.10008.5.1.4.1.1.13.1.3",   // Breast Tomosynthesis
    "1.2.840.10008.5.1.4.1.1.13.1.4",   // Breast Projection X-Ray (presentation)
    "1.2.840.10008.5.1.4.1.1.13.1.5",   // Breast Projection X-Ray (processing)
    "1.2.840.10008.5.1.4.1.1.14.1",     // Intravascular OCT (presentation)
    "1.2.840.10008.5.1.4.1.1.14.2",     // Intravascular OCT (processing)
    "1.2.840.10008.5.1.4.1.1.20",       // Nuclear Medicine
    "1.2.840.10008.5.1.4.1.1.30",       // Parametric Map
    "1.2.840.10008.5.1.4.1.1.66",       // Raw Data
    "1.2.840.10008.5.1.4.1.1.66.1",     // Spatial Registration
    "1.2.840.10008.5.1.4.1.1.66.2",     // Spatial Fiducials
    "1.2.840.10008.5.1.4.1.1.66.3",     // Deformable Spatial Registration
    "1.2.840.10008.5.1.4.1.1.66.4",     // Segmentation
    "1.2.840.10008.5.1.4.1.1.66.5",     // Surface Segmentation
    "1.2.840.10008.5.1.4.1.1.67",       // Real World Value Mapping
    "1.2.840.10008.5.1.4.1.1.77.1.1",   // VL Endoscopic
    "1.2.840.10008.5.1.4.1.1.77.1.1.1", // Video Endoscopic
    "1.2.840.10008.5.1.4.1.1.77.1.2",   // VL Microscopic
    "1.2.840.10008.5.1.4.1.1.77.1.2.1", // Video Microscopic
    "1.2.840.10008.5.1.4.1.1.77.1.3",   // VL Slide-Coordinates Microscopic
    "1.2.840.10008.5.1.4.1.1.77.1.4",   // VL Photographic
    "1.2.840.10008.5.1.4.1.1.77.1.4.1", // Video Photographic
    "1.2.840.10008.5.1.4.1.1.77.1.5.1", // Ophthalmic Photography 8 Bit
    "1.2.840.10008.5.1.4.1.1.77.1.5.2", // Ophthalmic Photography 16 Bit
    "1.2.840.10008.5.1.4.1.1.77.1.5.4", // Ophthalmic Tomography
    "1.2.840.10008.5.1.4.1.1.77.1.6",   // VL Whole Slide Microscopy
    "1.2.840.10008.5.1.4.1.1.78.1",     // Lensometry Measurements
    "1.2.840.10008.5.1.4.1.1.81.1",     // Ophthalmic Thickness Map
    "1.2.840.10008.5.1.4.1.1.88.11",    // Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",    // Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",    // Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",    // Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.40",    // Procedure Log
    "1.2.840.10008.5.1.4.1.1.88.50",    // Mammography CAD SR
    "1.2.840.10008.5.1.4.1.1.88.59",    // Key Object Selection
    "1.2.840.10008.5.1.4.1.1.88.65",    // Chest CAD SR
    "1.2.840.10008.5.1.4.1.1.88.67",    // X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.68",    // Radiopharmaceutical Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.69",    // Colon CAD SR
    "1.2.840.10008.5.1.4.1.1.88.71",    // Acquisition Context SR
    "1.2.840.10008.5.1.4.1.1.88.73",    // Patient Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.104.1",    // Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.104.2",    // Encapsulated CDA
    "1.2.840.10008.5.1.4.1.1.104.3",    // Encapsulated STL
    "1.2.840.10008.5.1.4.1.1.128",      // PET
    "1.2.840.10008.5.1.4.1.1.128.1",    // Legacy Converted Enhanced PET
    "1.2.840.10008.5.1.4.1.1.130",      // Enhanced PET
    "1.2.840.10008.5.1.4.1.1.131",      // Basic Structured Display
    "1.2.840.10008.5.1.4.1.1.481.1",    // RT Image
    "1.2.840.10008.5.1.4.1.1.481.2",    // RT Dose
    "1.2.840.10008.5.1.4.1.1.481.3",    // RT Structure Set
    "1.2.840.10008.5.1.4.1.1.481.4",    // RT Beams Treatment Record
    "1.2.840.10008.5.1.4.1.1.481.5",    // RT Plan
    "1.2.840.10008.5.1.4.1.1.481.6",    // RT Brachy Treatment Record
    "1.2.840.10008.5.1.4.1.1.481.7",    // RT Treatment Summary Record
    "1.2.840.10008.5.1.4.1.1.481.8",    // RT Ion Plan
    "1.2.840.10008.5.1.4.1.1.481.9",    // RT Ion Beams Treatment Record
];

/// The compressed syntaxes proposed beside the uncompressed ones when any is acceptable.
const COMPRESSED: &[&str] = &[
    "1.2.840.10008.1.2.4.70",  // JPEG Lossless, First-Order Prediction
    "1.2.840.10008.1.2.4.50",  // JPEG Baseline
    "1.2.840.10008.1.2.4.51",  // JPEG Extended
    "1.2.840.10008.1.2.4.57",  // JPEG Lossless
    "1.2.840.10008.1.2.4.80",  // JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  // JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  // JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  // JPEG 2000
    "1.2.840.10008.1.2.4.201", // HTJ2K Lossless
    "1.2.840.10008.1.2.4.203", // HTJ2K
    "1.2.840.10008.1.2.5",     // RLE Lossless
];

/// Every transfer syntax a retrieval may take when any is acceptable, uncompressed first.
pub fn any_syntax() -> Vec<String> {
    [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN]
        .iter()
        .chain(COMPRESSED)
        .map(|s| s.to_string())
        .collect()
}

/// Writes what is queued on `a` within `wait`; a PACS that stops reading (or a broken
/// connection) gets an A-ABORT, and the reason is returned.
async fn flush_within(a: &mut Assoc, wait: Duration) -> Result<(), DimseError> {
    match tokio::time::timeout(wait, a.peer.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            a.peer.abort().await;
            Err(DimseError::BadAnswer(e.to_string()))
        }
        Err(_) => {
            a.peer.abort().await;
            Err(DimseError::BadAnswer(format!(
                "the PACS stopped reading for {wait:?}"
            )))
        }
    }
}

/// What the PACS did not do, in words an operator can act on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DimseError {
    /// No association could be had (connection, rejection, timeout, no association free).
    #[error("{0}")]
    Unreachable(String),
    /// The PACS refused what the operation needs (a SOP class, a transfer syntax).
    #[error("{0}")]
    Refused(String),
    /// The PACS answered with a failure status.
    #[error("the PACS answered with status {0:#06x}")]
    Status(u16),
    /// The PACS broke the protocol or sent what the strict reader refuses.
    #[error("{0}")]
    BadAnswer(String),
}

/// A query key: tag, VR and the value as it goes into the identifier (unpadded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub tag: Tag,
    pub vr: VR,
    pub value: Vec<u8>,
}

/// The matches of a C-FIND, each read strictly, in the encoding they came in.
pub struct Matches {
    pub encoding: Encoding,
    pub sets: Vec<Vec<u8>>,
    /// More matched than were asked for: the search was cancelled there.
    pub truncated: bool,
    /// The PACS agreed to fuzzy semantic matching of person names on this association.
    pub fuzzy: bool,
}

/// What a retrieval yields, in order: for each instance its start, then its data set in
/// fragments (the last one marked), then at the end the PACS's counts or what went wrong.
#[derive(Debug)]
pub enum Retrieved {
    Instance {
        sop_class: String,
        sop_instance: String,
        transfer_syntax: String,
    },
    Data {
        bytes: Bytes,
        last: bool,
    },
    Done {
        completed: u16,
        failed: u16,
    },
    Failed(DimseError),
}

/// The identifier of a C-GET or C-MOVE of `target`: hierarchical, every level above the one
/// retrieved named, nothing else.
fn retrieve_identifier(enc: Encoding, target: &Target) -> Vec<u8> {
    let (level, mut keys): (&str, Vec<(Tag, VR, &str)>) = match (&target.series, &target.instance) {
        (Some(se), Some(i)) => (
            "IMAGE",
            vec![
                (tags::STUDY_INSTANCE_UID, VR::UI, &target.study),
                (tags::SERIES_INSTANCE_UID, VR::UI, se),
                (tags::SOP_INSTANCE_UID, VR::UI, i),
            ],
        ),
        (Some(se), None) => (
            "SERIES",
            vec![
                (tags::STUDY_INSTANCE_UID, VR::UI, &target.study),
                (tags::SERIES_INSTANCE_UID, VR::UI, se),
            ],
        ),
        _ => (
            "STUDY",
            vec![(tags::STUDY_INSTANCE_UID, VR::UI, &target.study)],
        ),
    };
    keys.push((tags::QUERY_RETRIEVE_LEVEL, VR::CS, level));
    keys.sort_by_key(|k| k.0);
    keys.iter()
        .flat_map(|(t, vr, v)| encode_element(enc, *t, *vr, v.as_bytes()))
        .collect()
}

/// What the final response of a C-GET or C-MOVE makes of a retrieval. Anything short of
/// complete success (a warning that some failed, a cancel, a failure) is not a whole answer:
/// the consumer must not present it as one.
fn outcome(status: u16, rsp: &Command) -> Result<Retrieved, DimseError> {
    let completed = rsp.completed.unwrap_or(0);
    let failed = rsp.failed.unwrap_or(0);
    if status != 0 || failed > 0 {
        return Err(DimseError::Status(if status == 0 {
            command::STATUS_SUBOPS_WARNING
        } else {
            status
        }));
    }
    Ok(Retrieved::Done { completed, failed })
}

/// Which instances a retrieval asks for (hierarchically: every level above is named).
#[derive(Debug, Clone)]
pub struct Target {
    pub study: String,
    pub series: Option<String>,
    pub instance: Option<String>,
}

/// Items in flight from a retrieval to its consumer: the PACS waits (TCP) when they are full.
const RETRIEVAL_QUEUE: usize = 16;
/// The most bytes the matches of one search may take.
const MAX_MATCH_BYTES: usize = 64 * 1024 * 1024;

/// The DIMSE services of one PACS, on associations of the gateway's own.
pub struct Dimse {
    pacs: Pacs,
    our_max: u32,
    timeout: Duration,
    /// How long a retrieval waits for its consumer (a client reading slowly) before it gives up.
    consumer_wait: Duration,
    reader: Limits,
    /// Associations open at once for translation (idle ones included); more wait (bounded
    /// by the timeout).
    slots: Arc<super::pool::Slots>,
    /// Idle associations by their presentation contexts.
    idle: super::pool::Pool<Assoc>,
    /// Where the receiver finds the retrievals by C-MOVE in flight (`pacs.retrieve = "c-move"`).
    moves: Arc<crate::dimse::receiver::MoveRegistry>,
}

/// Idle associations kept at most, and for how long.
const MAX_IDLE: usize = 8;
const MAX_IDLE_TIME: Duration = Duration::from_secs(10);

impl super::pool::Pooled for Assoc {
    fn peer(&mut self) -> &mut Peer {
        &mut self.peer
    }
}

/// An open association and what it accepted.
struct Assoc {
    peer: Peer,
    ac: AssociationAC,
    next_message_id: u16,
    _slot: super::pool::Slot,
}

impl Assoc {
    /// Whether the PACS accepted fuzzy semantic matching of person names for Study Root
    /// C-FIND (its answer to the extended negotiation, PS3.4 C.5.1.1: the third byte).
    fn fuzzy_find(&self) -> bool {
        self.ac.user_variables.iter().any(|v| {
            matches!(v, UserVariableItem::SopClassExtendedNegotiationSubItem(class, info)
                if class.trim_end_matches('\0') == STUDY_ROOT_FIND && info.get(2) == Some(&1))
        })
    }

    /// The transfer syntax the PACS accepted for presentation context `id`.
    fn accepted(&self, id: u8) -> Option<String> {
        self.ac
            .presentation_contexts
            .iter()
            .find(|r| r.id == id && r.reason == PresentationContextResultReason::Acceptance)
            .map(|r| r.transfer_syntax.trim_end_matches('\0').to_string())
    }

    fn message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        id
    }
}

impl Dimse {
    pub fn new(
        cfg: &crate::config::Config,
        moves: Arc<crate::dimse::receiver::MoveRegistry>,
        slots: Arc<super::pool::Slots>,
    ) -> Dimse {
        Dimse {
            moves,
            idle: super::pool::Pool::counted(MAX_IDLE, MAX_IDLE_TIME, &slots),
            slots,
            pacs: cfg.pacs.clone(),
            our_max: cfg.limits.max_pdu_length,
            timeout: cfg.limits.upstream_timeout,
            consumer_wait: cfg.limits.idle_timeout,
            reader: cfg.limits.reader(),
        }
    }

    /// An association for `key`'s contexts: an idle one, else a new one (an idle association
    /// of other contexts is released to make room under `pacs.max_associations`).
    async fn get_or_open(
        &self,
        key: &str,
        contexts: impl FnOnce() -> (Vec<PresentationContextProposed>, Vec<UserVariableItem>),
    ) -> Result<Assoc, DimseError> {
        if let Some(a) = self.idle.take(key) {
            return Ok(a);
        }
        let (c, r) = contexts();
        self.open(c, r).await
    }

    /// A place under `pacs.max_associations` (shared with the look-ups and client relays;
    /// idle associations are released to make room), up to the timeout.
    async fn slot(&self) -> Result<super::pool::Slot, DimseError> {
        self.slots.relay().await.map_err(DimseError::Unreachable)
    }

    async fn open(
        &self,
        contexts: Vec<PresentationContextProposed>,
        roles: Vec<UserVariableItem>,
    ) -> Result<Assoc, DimseError> {
        let slot = self.slot().await?;
        let mut user_variables = vec![
            UserVariableItem::MaxLength(self.our_max),
            UserVariableItem::ImplementationClassUID(
                crate::dicom::negotiation::IMPLEMENTATION_CLASS_UID.into(),
            ),
            UserVariableItem::ImplementationVersionName(
                crate::dicom::negotiation::IMPLEMENTATION_VERSION_NAME.into(),
            ),
        ];
        user_variables.extend(roles);
        let rq = AssociationRQ {
            protocol_version: 1,
            calling_ae_title: self.pacs.calling_ae_title.clone(),
            called_ae_title: self.pacs.ae_title.clone(),
            application_context_name: crate::dicom::negotiation::APPLICATION_CONTEXT.into(),
            presentation_contexts: contexts,
            user_variables,
        };
        let (stream, ac) = associate(&self.pacs, rq, self.timeout)
            .await
            .map_err(|e| DimseError::Unreachable(e.to_string()))?;
        let peer = Peer::new(
            "pacs",
            stream,
            self.our_max + 64,
            crate::dicom::negotiation::announced_max(&ac.user_variables),
        )
        .tolerating_command_tail();
        Ok(Assoc {
            peer,
            ac,
            next_message_id: 1,
            _slot: slot,
        })
    }

    /// The next message from the PACS within the timeout.
    async fn next(&self, a: &mut Assoc) -> Result<(u8, Box<Command>), DimseError> {
        self.next_within(a, self.timeout).await
    }

    /// The next message from the PACS within `wait`.
    async fn next_within(
        &self,
        a: &mut Assoc,
        wait: Duration,
    ) -> Result<(u8, Box<Command>), DimseError> {
        match tokio::time::timeout(wait, a.peer.next()).await {
            Err(_) => Err(DimseError::BadAnswer(format!(
                "the PACS did not answer within {wait:?}"
            ))),
            Ok(Incoming::Message(Event::Command { pc_id, command })) => Ok((pc_id, command)),
            Ok(Incoming::Message(Event::Data { .. })) => Err(DimseError::BadAnswer(
                "the PACS sent data without a command".into(),
            )),
            Ok(other) => Err(DimseError::BadAnswer(format!(
                "the association with the PACS ended: {other:?}"
            ))),
        }
    }

    /// A C-FIND at `level` (Study Root) with `keys` (QueryRetrieveLevel is added); at most
    /// `max` matches are kept, and the search is cancelled when more come. With `fuzzy`, the
    /// association proposes fuzzy semantic matching of person names (PS3.4 C.5.1.1, the C-FIND
    /// extended negotiation); [`Matches::fuzzy`] says whether the PACS agreed.
    pub async fn find(
        &self,
        level: &str,
        mut keys: Vec<Key>,
        max: usize,
        fuzzy: bool,
    ) -> Result<Matches, DimseError> {
        let key = if fuzzy { "find:fuzzy" } else { "find" };
        let contexts = || {
            let negotiation = if fuzzy {
                // Relational queries no, combined date-time matching no, fuzzy matching yes.
                vec![UserVariableItem::SopClassExtendedNegotiationSubItem(
                    STUDY_ROOT_FIND.into(),
                    vec![0, 0, 1],
                )]
            } else {
                Vec::new()
            };
            (
                vec![PresentationContextProposed {
                    id: 1,
                    abstract_syntax: STUDY_ROOT_FIND.into(),
                    transfer_syntaxes: vec![
                        EXPLICIT_VR_LITTLE_ENDIAN.into(),
                        IMPLICIT_VR_LITTLE_ENDIAN.into(),
                    ],
                }],
                negotiation,
            )
        };
        // A pooled association the PACS dropped silently gets a short wait for its first
        // answer, then a fresh one is tried (a search has no effect to repeat).
        if let Some(mut a) = self.idle.take(key) {
            let wait = (self.timeout / 4).max(Duration::from_secs(1));
            let mut k = keys.clone();
            match self.find_on(&mut a, level, &mut k, max, wait).await {
                r @ (Ok(_) | Err(DimseError::Status(_))) => {
                    self.idle.put(key.into(), a);
                    return r;
                }
                Err(_) => {
                    tracing::debug!("pooled association failed; opening a fresh one");
                    a.peer.abort().await;
                }
            }
        }
        let (c, r) = contexts();
        let mut a = self.open(c, r).await?;
        let r = self
            .find_on(&mut a, level, &mut keys, max, self.timeout)
            .await;
        match &r {
            Ok(_) | Err(DimseError::Status(_)) => self.idle.put(key.into(), a),
            Err(_) => a.peer.abort().await,
        }
        r
    }

    async fn find_on(
        &self,
        a: &mut Assoc,
        level: &str,
        keys: &mut Vec<Key>,
        max: usize,
        first_wait: Duration,
    ) -> Result<Matches, DimseError> {
        let ts = a
            .accepted(1)
            .ok_or_else(|| DimseError::Refused("the PACS refused Study Root C-FIND".into()))?;
        let enc = syntax::readable(&ts)
            .ok_or_else(|| DimseError::BadAnswer(format!("unknown transfer syntax {ts}")))?
            .encoding;
        keys.retain(|k| k.tag != tags::QUERY_RETRIEVE_LEVEL);
        keys.push(Key {
            tag: tags::QUERY_RETRIEVE_LEVEL,
            vr: VR::CS,
            value: level.as_bytes().to_vec(),
        });
        keys.sort_by_key(|k| k.tag);
        let ident: Vec<u8> = keys
            .iter()
            .flat_map(|k| encode_element(enc, k.tag, k.vr, &k.value))
            .collect();
        let msg_id = a.message_id();
        let cmd = Command::request(command::C_FIND_RQ, msg_id, STUDY_ROOT_FIND, true);
        a.peer
            .send_message(1, &cmd.encode(), Some(&ident))
            .await
            .map_err(|e| DimseError::BadAnswer(e.to_string()))?;
        let mut out = Matches {
            encoding: enc,
            sets: Vec::new(),
            truncated: false,
            fuzzy: a.fuzzy_find(),
        };
        let mut bytes = 0usize;
        let mut cancelled = false;
        // A pooled association that died silently shows at the first answer: only that one
        // gets the short wait.
        let mut wait = first_wait;
        loop {
            let (pc_id, rsp) = self.next_within(a, wait).await?;
            wait = self.timeout;
            if rsp.field != command::C_FIND_RSP || rsp.responded_to != Some(msg_id) || pc_id != 1 {
                return Err(DimseError::BadAnswer(
                    "the PACS answered another request than the C-FIND".into(),
                ));
            }
            let status = rsp.status.unwrap_or(command::STATUS_CANNOT_UNDERSTAND);
            if rsp.has_data_set() {
                let data = a
                    .peer
                    .collect_data(pc_id, 1 << 20, self.timeout)
                    .await
                    .map_err(|e| DimseError::BadAnswer(e.to_string()))?;
                if command::is_pending(status) && !cancelled {
                    DataSet::read(&data, enc, self.reader).map_err(|v| {
                        DimseError::BadAnswer(format!("a C-FIND match is not well formed: {v}"))
                    })?;
                    bytes += data.len();
                    if bytes > MAX_MATCH_BYTES {
                        return Err(DimseError::BadAnswer(
                            "the PACS's matches are larger than the gateway holds".into(),
                        ));
                    }
                    if out.sets.len() < max {
                        out.sets.push(data);
                    } else {
                        // One more than asked: the rest is not wanted.
                        out.truncated = true;
                        cancelled = true;
                        let mut cancel = Command::request(command::C_CANCEL_RQ, 0, "", false);
                        cancel.affected_sop_class = None;
                        cancel.message_id = None;
                        cancel.priority = None;
                        cancel.responded_to = Some(msg_id);
                        a.peer
                            .send_message(1, &cancel.encode(), None)
                            .await
                            .map_err(|e| DimseError::BadAnswer(e.to_string()))?;
                    }
                }
            }
            if !command::is_pending(status) {
                // A cancelled search ends with Cancel (FE00H); a failure otherwise.
                if status != 0 && !(cancelled && status == 0xFE00) {
                    return Err(DimseError::Status(status));
                }
                return Ok(out);
            }
        }
    }

    /// Retrieves `target` by C-GET, the instances in one of `syntaxes` (in order of
    /// preference; the PACS chooses per SOP class). What arrives is sent to the returned
    /// receiver as it arrives; dropping the receiver ends the retrieval (A-ABORT).
    pub fn retrieve(
        self: &Arc<Self>,
        target: Target,
        syntaxes: Vec<String>,
    ) -> mpsc::Receiver<Retrieved> {
        if self.pacs.retrieve == crate::config::Retrieve::Move {
            return self.retrieve_by_move(target, syntaxes);
        }
        let (tx, rx) = mpsc::channel(RETRIEVAL_QUEUE);
        let me = self.clone();
        tokio::spawn(async move {
            let key = format!("get:{}", syntaxes.join(","));
            let contexts = || {
                let mut contexts = vec![PresentationContextProposed {
                    id: 1,
                    abstract_syntax: STUDY_ROOT_GET.into(),
                    transfer_syntaxes: vec![
                        EXPLICIT_VR_LITTLE_ENDIAN.into(),
                        IMPLICIT_VR_LITTLE_ENDIAN.into(),
                    ],
                }];
                let mut roles = Vec::new();
                for (i, class) in STORAGE_CLASSES.iter().enumerate() {
                    contexts.push(PresentationContextProposed {
                        id: (3 + 2 * i) as u8,
                        abstract_syntax: (*class).into(),
                        transfer_syntaxes: syntaxes.clone(),
                    });
                    roles.push(UserVariableItem::ScuScpRoleSelectionSubItem(
                        (*class).into(),
                        RequestorRoles {
                            scu: false,
                            scp: true,
                        },
                    ));
                }
                (contexts, roles)
            };
            let mut a = match me.get_or_open(&key, contexts).await {
                Ok(a) => a,
                Err(e) => {
                    let _ = tx.send(Retrieved::Failed(e)).await;
                    return;
                }
            };
            // The association (and its place under pacs.max_associations) is given back
            // before the last item is handed on, within the consumer's wait.
            let last = match me.get_on(&mut a, &target, &tx).await {
                Ok(done) => {
                    me.idle.put(key, a);
                    done
                }
                Err(DimseError::Status(s)) => {
                    me.idle.put(key, a);
                    Retrieved::Failed(DimseError::Status(s))
                }
                Err(e) => {
                    a.peer.abort().await;
                    drop(a);
                    Retrieved::Failed(e)
                }
            };
            let _ = me.hand(&tx, last).await;
        });
        rx
    }

    /// Retrieves `target` by C-MOVE to the gateway itself (`pacs.calling_ae_title`, served by
    /// the receiver at `pacs.receive_listen`): the move is registered under a random message ID
    /// the PACS names as Move Originator Message ID on each sub-operation, and the receiver
    /// hands each instance into this retrieval as it arrives. The PACS chooses the transfer
    /// syntax it offers the receiver; an instance in one not among `syntaxes` ends the
    /// retrieval (the consumer asked for those only).
    fn retrieve_by_move(
        self: &Arc<Self>,
        target: Target,
        syntaxes: Vec<String>,
    ) -> mpsc::Receiver<Retrieved> {
        let (tx, rx) = mpsc::channel(RETRIEVAL_QUEUE);
        let me = self.clone();
        tokio::spawn(async move {
            let (inner_tx, mut inner) = mpsc::channel(RETRIEVAL_QUEUE);
            let route = crate::dimse::receiver::Route::to(
                crate::dimse::receiver::Sink::Channel(inner_tx),
                0,
            );
            let Some(guard) = me.moves.register(route) else {
                let why = DimseError::Unreachable("too many C-MOVEs in flight".into());
                let _ = me.hand(&tx, Retrieved::Failed(why)).await;
                return;
            };
            let key = "move".to_string();
            let contexts = || {
                (
                    vec![PresentationContextProposed {
                        id: 1,
                        abstract_syntax: STUDY_ROOT_MOVE.into(),
                        transfer_syntaxes: vec![
                            EXPLICIT_VR_LITTLE_ENDIAN.into(),
                            IMPLICIT_VR_LITTLE_ENDIAN.into(),
                        ],
                    }],
                    Vec::new(),
                )
            };
            let mut a = match me.get_or_open(&key, contexts).await {
                Ok(a) => a,
                Err(e) => {
                    let _ = me.hand(&tx, Retrieved::Failed(e)).await;
                    return;
                }
            };
            let last = match me
                .move_on(&mut a, &target, guard.id, &mut inner, &syntaxes, &tx)
                .await
            {
                Ok(done) => {
                    me.idle.put(key, a);
                    done
                }
                Err(DimseError::Status(s)) => {
                    me.idle.put(key, a);
                    Retrieved::Failed(DimseError::Status(s))
                }
                Err(e) => {
                    a.peer.abort().await;
                    drop(a);
                    Retrieved::Failed(e)
                }
            };
            // No more instances join this retrieval: any still arriving are refused.
            drop(guard);
            let _ = me.hand(&tx, last).await;
        });
        rx
    }

    /// The C-MOVE of [`Dimse::retrieve_by_move`] on `a`: the receiver's items are passed on
    /// while the PACS's responses are read, until its final one. The PACS answers each
    /// sub-operation only once the receiver has handed all of it on, so nothing of it can
    /// still be in flight after the final response.
    async fn move_on(
        &self,
        a: &mut Assoc,
        target: &Target,
        msg_id: u16,
        inner: &mut mpsc::Receiver<Retrieved>,
        syntaxes: &[String],
        tx: &mpsc::Sender<Retrieved>,
    ) -> Result<Retrieved, DimseError> {
        let ts = a
            .accepted(1)
            .ok_or_else(|| DimseError::Refused("the PACS refused Study Root C-MOVE".into()))?;
        let enc = syntax::readable(&ts)
            .ok_or_else(|| DimseError::BadAnswer(format!("unknown transfer syntax {ts}")))?
            .encoding;
        let ident = retrieve_identifier(enc, target);
        let mut cmd = Command::request(command::C_MOVE_RQ, msg_id, STUDY_ROOT_MOVE, true);
        cmd.move_destination = Some(self.pacs.calling_ae_title.clone());
        a.peer
            .send_message(1, &cmd.encode(), Some(&ident))
            .await
            .map_err(|e| DimseError::BadAnswer(e.to_string()))?;
        let pass = |item: Retrieved| async {
            if let Retrieved::Instance {
                transfer_syntax, ..
            } = &item
                && !syntaxes.iter().any(|s| s == transfer_syntax)
            {
                return Err(DimseError::BadAnswer(format!(
                    "the PACS moved an instance in {transfer_syntax}, which was not asked for"
                )));
            }
            self.hand(tx, item).await
        };
        // The PACS's responses are read by one future kept across the loop (a read given up
        // midway could lose part of a PDU); the instances are taken in between. A stretch of
        // the timeout with neither ends the retrieval.
        let final_rsp = self.final_move_rsp(a, msg_id);
        tokio::pin!(final_rsp);
        let mut quiet_until = tokio::time::Instant::now() + self.timeout;
        let done = loop {
            tokio::select! {
                item = inner.recv() => match item {
                    Some(item) => {
                        pass(item).await?;
                        quiet_until = tokio::time::Instant::now() + self.timeout;
                    }
                    None => return Err(DimseError::BadAnswer("the move's route ended".into())),
                },
                r = &mut final_rsp => break r?,
                _ = tokio::time::sleep_until(quiet_until) => {
                    return Err(DimseError::BadAnswer(format!(
                        "the PACS moved nothing and answered nothing within {:?}",
                        self.timeout
                    )));
                }
            }
        };
        // Every sub-operation was answered before the final response, so all of their
        // instances are queued already.
        while let Ok(item) = inner.try_recv() {
            pass(item).await?;
        }
        Ok(done)
    }

    /// Reads the PACS's C-MOVE responses to `msg_id` up to the final one: its counts, or the
    /// failure a partial move is.
    async fn final_move_rsp(&self, a: &mut Assoc, msg_id: u16) -> Result<Retrieved, DimseError> {
        loop {
            // Pending responses may be rare (a PACS may send none until the end): the quiet
            // time of the caller bounds the wait, not this one.
            let (pc_id, rsp) = self.next_within(a, self.timeout * 360).await?;
            if pc_id != 1 || rsp.field != command::C_MOVE_RSP || rsp.responded_to != Some(msg_id) {
                return Err(DimseError::BadAnswer(
                    "the PACS sent an unexpected message during C-MOVE".into(),
                ));
            }
            if rsp.has_data_set() {
                a.peer
                    .discard_data(pc_id, self.timeout)
                    .await
                    .map_err(|e| DimseError::BadAnswer(e.to_string()))?;
            }
            let status = rsp.status.unwrap_or(command::STATUS_CANNOT_UNDERSTAND);
            if command::is_pending(status) {
                continue;
            }
            return outcome(status, &rsp);
        }
    }

    /// Hands `item` to the retrieval's consumer; `Err` when it is gone or stalled.
    async fn hand(&self, tx: &mpsc::Sender<Retrieved>, item: Retrieved) -> Result<(), DimseError> {
        match tokio::time::timeout(self.consumer_wait, tx.send(item)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(DimseError::Unreachable(
                "the retrieval's client stopped reading".into(),
            )),
        }
    }

    async fn get_on(
        &self,
        a: &mut Assoc,
        target: &Target,
        tx: &mpsc::Sender<Retrieved>,
    ) -> Result<Retrieved, DimseError> {
        let ts = a
            .accepted(1)
            .ok_or_else(|| DimseError::Refused("the PACS refused Study Root C-GET".into()))?;
        let enc = syntax::readable(&ts)
            .ok_or_else(|| DimseError::BadAnswer(format!("unknown transfer syntax {ts}")))?
            .encoding;
        let ident = retrieve_identifier(enc, target);
        let msg_id = a.message_id();
        let cmd = Command::request(command::C_GET_RQ, msg_id, STUDY_ROOT_GET, true);
        a.peer
            .send_message(1, &cmd.encode(), Some(&ident))
            .await
            .map_err(|e| DimseError::BadAnswer(e.to_string()))?;
        loop {
            let (pc_id, rsp) = self.next(a).await?;
            match rsp.field {
                command::C_STORE_RQ if pc_id != 1 && rsp.has_data_set() => {
                    let (Some(class), Some(instance), Some(ts)) = (
                        rsp.affected_sop_class.clone(),
                        rsp.affected_sop_instance.clone(),
                        a.accepted(pc_id),
                    ) else {
                        return Err(DimseError::BadAnswer(
                            "the PACS sent a C-STORE without its SOP class and instance, or on a context it was not given".into(),
                        ));
                    };
                    let class = class.trim_end_matches('\0').to_string();
                    let instance = instance.trim_end_matches('\0').to_string();
                    self.hand(
                        tx,
                        Retrieved::Instance {
                            sop_class: class,
                            sop_instance: instance,
                            transfer_syntax: ts,
                        },
                    )
                    .await?;
                    loop {
                        let (bytes, last) = a
                            .peer
                            .next_fragment(pc_id, self.timeout)
                            .await
                            .map_err(|e| DimseError::BadAnswer(e.to_string()))?;
                        self.hand(tx, Retrieved::Data { bytes, last }).await?;
                        if last {
                            break;
                        }
                    }
                    // Received: the consumer judges it; the PACS's part is done.
                    let answer = rsp.response(command::STATUS_SUCCESS, None);
                    a.peer
                        .send_message(pc_id, &answer.encode(), None)
                        .await
                        .map_err(|e| DimseError::BadAnswer(e.to_string()))?;
                }
                command::C_GET_RSP if pc_id == 1 && rsp.responded_to == Some(msg_id) => {
                    if rsp.has_data_set() {
                        // The failed SOP instance list: counted, not read further.
                        a.peer
                            .discard_data(pc_id, self.timeout)
                            .await
                            .map_err(|e| DimseError::BadAnswer(e.to_string()))?;
                    }
                    let status = rsp.status.unwrap_or(command::STATUS_CANNOT_UNDERSTAND);
                    if command::is_pending(status) {
                        continue;
                    }
                    return outcome(status, &rsp);
                }
                _ => {
                    return Err(DimseError::BadAnswer(
                        "the PACS sent an unexpected message during C-GET".into(),
                    ));
                }
            }
        }
    }

    /// Stores one instance by C-STORE: its data set (no file meta) in `syntax_uid` arrives on
    /// `data`; an `Err` item (the client's part was refused or broke off) aborts the
    /// association, so the PACS keeps nothing of it. The PACS's status when it answered.
    pub async fn store<E>(
        &self,
        sop_class: &str,
        sop_instance: &str,
        syntax_uid: &str,
        mut data: mpsc::Receiver<Result<Bytes, E>>,
    ) -> Result<u16, DimseError> {
        let key = format!("store:{sop_class}:{syntax_uid}");
        let contexts = || {
            (
                vec![PresentationContextProposed {
                    id: 1,
                    abstract_syntax: sop_class.into(),
                    transfer_syntaxes: vec![syntax_uid.into()],
                }],
                Vec::new(),
            )
        };
        let mut a = self.get_or_open(&key, contexts).await?;
        if a.accepted(1).as_deref() != Some(syntax_uid) {
            // Kept: the next instance of this class and syntax is refused without asking again.
            self.idle.put(key, a);
            return Err(DimseError::Refused(
                "the PACS does not accept this SOP class in this transfer syntax".into(),
            ));
        }
        let msg_id = a.message_id();
        let mut cmd = Command::request(command::C_STORE_RQ, msg_id, sop_class, true);
        cmd.affected_sop_instance = Some(sop_instance.to_string());
        let wait = self.timeout;
        if let Err(e) = a.peer.queue_message(1, &cmd.encode(), None) {
            a.peer.abort().await;
            return Err(DimseError::BadAnswer(e.to_string()));
        }
        flush_within(&mut a, wait).await?;
        // One chunk is held back: the last fragment is marked, so it goes when the end is known.
        let mut carry: Option<u8> = None;
        let mut held: Option<Bytes> = None;
        loop {
            match data.recv().await {
                Some(Ok(b)) => {
                    if let Some(h) = held.replace(b) {
                        a.peer.queue_even(1, &h, false, &mut carry);
                        flush_within(&mut a, wait).await?;
                    }
                }
                Some(Err(_)) | None if held.is_none() => {
                    a.peer.abort().await;
                    return Err(DimseError::BadAnswer("the instance is empty".into()));
                }
                Some(Err(_)) => {
                    a.peer.abort().await;
                    return Err(DimseError::Refused(
                        "the instance was not sent whole".into(),
                    ));
                }
                None => break,
            }
        }
        if let Some(h) = held {
            a.peer.queue_even(1, &h, true, &mut carry);
        }
        flush_within(&mut a, wait).await?;
        let answer = self.next(&mut a).await;
        match answer {
            Ok((1, rsp))
                if rsp.field == command::C_STORE_RSP
                    && rsp.responded_to == Some(msg_id)
                    && !rsp.has_data_set() =>
            {
                self.idle.put(key, a);
                Ok(rsp.status.unwrap_or(command::STATUS_CANNOT_UNDERSTAND))
            }
            Ok(_) => {
                a.peer.abort().await;
                Err(DimseError::BadAnswer(
                    "the PACS answered the C-STORE with another message".into(),
                ))
            }
            Err(e) => {
                a.peer.abort().await;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dicom::command::Service;

    #[test]
    fn a_retrieval_proposes_storage_classes_within_one_association() {
        // One context for the retrieval, odd ids from 3: the last must stay below 256.
        assert!(3 + 2 * (STORAGE_CLASSES.len() - 1) <= 255);
        let mut seen = std::collections::HashSet::new();
        for c in STORAGE_CLASSES {
            assert!(seen.insert(c), "{c} listed twice");
            assert_eq!(Service::of(c), Service::Storage, "{c}");
        }
        for t in any_syntax() {
            assert!(
                syntax::readable(&t).is_some(),
                "{t} is proposed but not read"
            );
        }
    }
}
