//! One generation of the configuration: everything `serve` builds from one [`Config`] (the
//! trust core, the policy core with its PACS and EHR ports, each front end's context), and the
//! step from one generation to the next that SIGHUP takes.
//!
//! Owns: building a generation, carrying over what must outlive one (admission counters,
//! C-MOVEs in flight, association ids, request slots, readiness state), and each generation's
//! background readiness checks. Associations and requests take the generation current when
//! they begin and keep it to their end; nothing here reaches into running ones. Must not know
//! signals, listeners or protocols.

use crate::config::Config;
use crate::dimse;
use crate::policy::{Policy, Ports};
use crate::trust::TrustCore;
use crate::web::WebCtx;
use std::sync::Arc;
use tokio::sync::watch;

/// What one configuration makes.
pub struct Generation {
    pub cfg: Arc<Config>,
    pub dimse: Arc<dimse::Ctx>,
    pub web: Arc<WebCtx>,
    /// Ends this generation's background checks when it is replaced or the gateway stops.
    retire: watch::Sender<bool>,
}

impl Generation {
    /// The generation the gateway starts with.
    pub fn first(cfg: Config) -> anyhow::Result<Generation> {
        Generation::build(cfg, None)
    }

    /// The generation after this one, from a configuration read again; this one keeps
    /// serving what runs on it.
    pub fn next(&self, cfg: Config) -> anyhow::Result<Generation> {
        Generation::build(cfg, Some(self))
    }

    fn build(cfg: Config, prev: Option<&Generation>) -> anyhow::Result<Generation> {
        let cfg = Arc::new(cfg);
        // The gateway's own authorization server first: the trust core verifies its tokens
        // with its key. Exchanged subject tokens stay remembered across configurations.
        let exchanged = prev.map(|p| p.web.exchanged()).unwrap_or_default();
        let authority = crate::authority::Authority::load(&cfg, exchanged.clone())?;
        let own_keys = authority
            .as_ref()
            .map(|a| a.public_jwks())
            .unwrap_or_default();
        let trust = TrustCore::with_own_keys(&cfg, &own_keys)?;
        // The policy core's ports: the PACS answers who owns a UID, the EHR answers FHIR reads.
        // One count of the associations open to the PACS (pacs.max_associations) for the
        // look-ups, DICOMweb by translation and client relays of this configuration.
        let slots = crate::pacs::Slots::new(cfg.pacs.max_associations, cfg.limits.upstream_timeout);
        let lookup = Arc::new(crate::pacs::PacsLookup::new(&cfg, slots.clone()));
        let ehr = Arc::new(crate::ehr::Ehr::new(&cfg, trust.clone())?);
        let policy = Arc::new(Policy::new(&cfg, Ports::new(lookup, ehr)));
        let (dimse, web) = match prev {
            None => {
                let readiness = crate::readiness::Readiness::new(&trust.issuer_names());
                let d = dimse::Ctx::new(cfg.clone(), trust.clone(), policy.clone(), slots.clone());
                let moves = d.moves.clone();
                (
                    d,
                    WebCtx::new(
                        cfg.clone(),
                        trust.clone(),
                        policy,
                        readiness,
                        moves,
                        slots,
                        (authority, exchanged),
                    )?,
                )
            }
            Some(p) => {
                let web = p.web.succeeding(
                    cfg.clone(),
                    trust.clone(),
                    policy.clone(),
                    p.dimse.moves.clone(),
                    slots.clone(),
                    authority,
                )?;
                // Only once nothing can fail: a refused configuration changes nothing.
                p.web.readiness().set_issuers(&trust.issuer_names());
                crate::metrics::keep_issuers(&trust.issuer_names());
                (
                    p.dimse
                        .succeeding(cfg.clone(), trust.clone(), policy, slots),
                    web,
                )
            }
        };
        let (retire, retired) = watch::channel(false);
        // The checks /readyz answers from, against this generation's PACS and issuers.
        tokio::spawn(
            web.readiness()
                .clone()
                .run(cfg.pacs.clone(), trust, retired),
        );
        Ok(Generation {
            cfg,
            dimse,
            web,
            retire,
        })
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let _ = self.retire.send(true);
    }
}
