//! Readiness: whether the gateway can serve now. Ready when the PACS answered the gateway's
//! C-ECHO and every trusted issuer's keys (or introspection endpoint) were reachable, each
//! within the last [`WINDOW`].
//!
//! Owns: the background checks (the PACS every [`CHECK_EVERY`], an issuer again once its last
//! success is [`ISSUER_EVERY`] old, each bounded by [`CHECK_DEADLINE`]), the state they leave,
//! and the report `/readyz` gives from it at once, never waiting for a check. Must not know
//! HTTP: the web front end turns a [`Report`] into a response.

use crate::config::Pacs;
use crate::trust::TrustCore;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How recent a success must be to count.
pub const WINDOW: Duration = Duration::from_secs(30);
/// How often the checks run.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);
/// An issuer that answered is asked again only after this long (its keys are fetched each time:
/// a few requests a minute, not one per check).
pub const ISSUER_EVERY: Duration = Duration::from_secs(20);
/// The longest one check may take.
pub const CHECK_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default)]
struct Check {
    ok_at: Option<Instant>,
    /// Why the last check failed; cleared by a success.
    error: Option<String>,
}

impl Check {
    fn fresh(&self, now: Instant, window: Duration) -> bool {
        self.ok_at
            .is_some_and(|t| now.saturating_duration_since(t) <= window)
    }

    /// Records a result; returns whether the last result changed between success and failure
    /// (the first result counts as a change).
    fn set(&mut self, r: Result<(), String>, now: Instant) -> bool {
        let first = self.ok_at.is_none() && self.error.is_none();
        let was_ok = self.error.is_none();
        match r {
            Ok(()) => {
                self.ok_at = Some(now);
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
        first || was_ok != self.error.is_none()
    }
}

/// One component that is not ready, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Down {
    /// `pacs`, or the issuer's URL.
    pub what: String,
    pub reason: String,
}

/// What `/readyz` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub ready: bool,
    pub down: Vec<Down>,
}

/// The state the checks leave.
pub struct Readiness {
    pacs: RwLock<Check>,
    issuers: RwLock<BTreeMap<String, Check>>,
}

impl Readiness {
    /// Nothing checked yet: not ready until the first checks succeed.
    pub fn new(issuers: &[String]) -> Arc<Readiness> {
        Arc::new(Readiness {
            pacs: RwLock::new(Check::default()),
            issuers: RwLock::new(
                issuers
                    .iter()
                    .map(|i| (i.clone(), Check::default()))
                    .collect(),
            ),
        })
    }

    /// The report as of `now`, from the last checks' results.
    pub fn report_at(&self, now: Instant) -> Report {
        let mut down = Vec::new();
        let mut judge = |what: &str, c: &Check| {
            if !c.fresh(now, WINDOW) {
                let reason = match (&c.error, c.ok_at) {
                    (Some(e), _) => e.clone(),
                    (None, Some(_)) => format!("no successful check within {WINDOW:?}"),
                    (None, None) => "not checked yet".to_string(),
                };
                down.push(Down {
                    what: what.to_string(),
                    reason,
                });
            }
        };
        judge("pacs", &self.pacs.read().unwrap_or_else(|e| e.into_inner()));
        for (name, c) in self
            .issuers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            judge(name, c);
        }
        Report {
            ready: down.is_empty(),
            down,
        }
    }

    /// The issuers to check after a reload: those kept keep their last results, new ones
    /// start unchecked, dropped ones are forgotten.
    pub fn set_issuers(&self, issuers: &[String]) {
        let mut m = self.issuers.write().unwrap_or_else(|e| e.into_inner());
        m.retain(|name, _| issuers.contains(name));
        for i in issuers {
            m.entry(i.clone()).or_default();
        }
    }

    pub fn report(&self) -> Report {
        self.report_at(Instant::now())
    }

    fn record_pacs(&self, r: Result<(), String>, now: Instant) {
        let mut c = self.pacs.write().unwrap_or_else(|e| e.into_inner());
        log_change("pacs", &r, c.set(r.clone(), now));
    }

    fn record_issuer(&self, issuer: &str, r: Result<(), String>, now: Instant) {
        let mut m = self.issuers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = m.get_mut(issuer) {
            log_change(issuer, &r, c.set(r.clone(), now));
        }
    }

    /// The issuers whose last success is older than [`ISSUER_EVERY`] (or that failed).
    fn issuers_due(&self, now: Instant) -> Vec<String> {
        self.issuers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, c)| !c.fresh(now, ISSUER_EVERY) || c.error.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Runs the checks until `stop` turns true.
    pub async fn run(
        self: Arc<Self>,
        pacs: Pacs,
        trust: Arc<TrustCore>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let due = self.issuers_due(Instant::now());
            let issuers = due.iter().map(|i| {
                let trust = trust.clone();
                async move {
                    let r = match tokio::time::timeout(CHECK_DEADLINE, trust.probe_issuer(i)).await
                    {
                        Ok(r) => r,
                        Err(_) => Err(format!("no answer within {CHECK_DEADLINE:?}")),
                    };
                    (i, r)
                }
            });
            let (echo, answers) = tokio::join!(
                crate::pacs::echo::echo(&pacs, CHECK_DEADLINE),
                futures_util::future::join_all(issuers)
            );
            let now = Instant::now();
            self.record_pacs(echo, now);
            for (i, r) in answers {
                self.record_issuer(i, r, now);
            }
            tokio::select! {
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// One log line when a component goes down or comes back, not one per check.
fn log_change(what: &str, r: &Result<(), String>, changed: bool) {
    if !changed {
        return;
    }
    match r {
        Ok(()) => tracing::info!(component = %what, "readiness: up"),
        Err(e) => tracing::warn!(component = %what, reason = %e, "readiness: down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_keeps_the_results_of_issuers_it_keeps() {
        let (a, b) = (
            "https://a.example".to_string(),
            "https://b.example".to_string(),
        );
        let r = Readiness::new(std::slice::from_ref(&a));
        let t0 = Instant::now();
        r.record_pacs(Ok(()), t0);
        r.record_issuer(&a, Ok(()), t0);
        assert!(r.report_at(t0).ready);
        r.set_issuers(&[a.clone(), b.clone()]);
        let rep = r.report_at(t0);
        assert_eq!(rep.down.len(), 1, "{rep:?}");
        assert_eq!(rep.down[0].what, b);
        r.set_issuers(std::slice::from_ref(&a));
        assert!(r.report_at(t0).ready, "a dropped issuer is not waited for");
    }

    #[test]
    fn ready_only_while_every_component_succeeded_within_the_window() {
        let r = Readiness::new(&["https://ehr.example".to_string()]);
        let t0 = Instant::now();
        let rep = r.report_at(t0);
        assert!(!rep.ready, "nothing checked yet is not ready");
        assert_eq!(rep.down.len(), 2, "{rep:?}");
        assert!(rep.down.iter().all(|d| d.reason == "not checked yet"));

        r.record_pacs(Ok(()), t0);
        r.record_issuer("https://ehr.example", Ok(()), t0);
        assert!(r.report_at(t0 + Duration::from_secs(29)).ready);
        assert_eq!(
            r.issuers_due(t0 + Duration::from_secs(5)),
            Vec::<String>::new()
        );
        assert_eq!(
            r.issuers_due(t0 + ISSUER_EVERY + Duration::from_secs(1))
                .len(),
            1
        );

        // No success for longer than the window: down, though no check failed.
        let late = r.report_at(t0 + WINDOW + Duration::from_secs(1));
        assert!(!late.ready);
        assert_eq!(late.down.len(), 2, "{late:?}");

        // One failed check inside the window does not flap readiness; once the window has
        // passed without a success, the report names the last failure.
        let t1 = t0 + Duration::from_secs(10);
        r.record_pacs(Err("cannot connect to the PACS".into()), t1);
        assert!(r.report_at(t1).ready, "answered within the window");
        let rep = r.report_at(t0 + WINDOW + Duration::from_secs(1));
        assert_eq!(
            rep.down.first(),
            Some(&Down {
                what: "pacs".into(),
                reason: "cannot connect to the PACS".into()
            }),
            "{rep:?}"
        );
        assert_eq!(
            r.issuers_due(t1 + Duration::from_secs(1)),
            Vec::<String>::new(),
            "an issuer that answered is not asked at every check"
        );
        r.record_issuer("https://ehr.example", Err("keys: 500".into()), t1);
        assert_eq!(r.issuers_due(t1), vec!["https://ehr.example".to_string()]);
        r.record_pacs(Ok(()), t1);
        r.record_issuer("https://ehr.example", Ok(()), t1);
        assert!(r.report_at(t1).ready);
    }
}
