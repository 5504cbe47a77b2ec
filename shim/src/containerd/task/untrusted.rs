//! What the guest tells the shim unasked is hostile input: it is checked
//! against what the shim knows before it becomes an event, and the log
//! lines it causes are rate-limited (a guest must not flood containerd's
//! event stream or the shim's log).

use std::time::{Duration, Instant};

/// Logs at most one line per `every`, counting the ones it held back.
#[derive(Debug)]
pub struct RateLimited {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl RateLimited {
    pub fn new(every: Duration) -> Self {
        RateLimited {
            every,
            last: None,
            held: 0,
        }
    }

    /// `line()` with the number of lines held back since the last one, if
    /// one may be logged at `now`; else None (and one more is held back).
    pub fn admit(&mut self, now: Instant, line: impl FnOnce() -> String) -> Option<String> {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        let held = std::mem::take(&mut self.held);
        Some(if held == 0 {
            line()
        } else {
            format!("{} ({held} more like it held back)", line())
        })
    }
}

/// A guest-given name as a log line may show it: quoted, escaped, at most
/// 64 characters.
pub fn shown(name: &str) -> String {
    let short: String = name.chars().take(64).collect();
    format!(
        "{short:?}{}",
        if short.len() < name.len() { "…" } else { "" }
    )
}

/// Whether an OOM the guest reports for container `id` becomes a TaskOOM
/// event: only for a container this shim runs (`known`); any other is
/// dropped, and said in the log at the limiter's pace.
pub fn oom_to_publish(id: &str, known: bool, limit: &mut RateLimited, now: Instant) -> bool {
    if !known {
        if let Some(line) = limit.admit(now, || {
            format!(
                "the guest reported an OOM kill for {}, no container of this pod: dropped",
                shown(id)
            )
        }) {
            tracing::warn!("{line}");
        }
    }
    known
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_unknown_ooms_is_dropped_and_logged_a_line_per_period() {
        let mut limit = RateLimited::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut logged = Vec::new();
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i * 3);
            let line = limit.admit(now, || "x".into());
            logged.extend(line);
            assert!(!oom_to_publish(
                "ghost",
                false,
                &mut RateLimited::new(Duration::ZERO),
                now
            ));
        }
        // 30 s of a guest's flood: a line at 0, 10 and 20 s.
        assert_eq!(logged.len(), 3, "{logged:?}");
        assert!(
            logged[1].contains("3333 more like it held back"),
            "{logged:?}"
        );
        assert!(oom_to_publish("app", true, &mut limit, t0));
    }

    #[test]
    fn guest_names_are_shown_escaped_and_short() {
        assert_eq!(shown("app"), "\"app\"");
        assert_eq!(shown("a\nreboot: Power down"), "\"a\\nreboot: Power down\"");
        let long = "x".repeat(1000);
        assert_eq!(shown(&long).chars().count(), 64 + 3);
    }
}
