//! Status conditions: set one, keeping `lastTransitionTime` when its status did not change.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Sets condition `type_` in `conditions`. The transition time moves only when the status
/// changes, as `kubectl wait --for=condition=…` and humans expect.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) {
    let status = if status { "True" } else { "False" }.to_string();
    set_status(conditions, type_, status, reason, message, generation);
}

/// Like [`set`], with `Unknown` allowed.
pub fn set_status(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: String,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) {
    let message = truncate(message.into(), 32 * 1024);
    let now = Time(jiff_now());
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            observed_generation: generation,
            last_transition_time: now,
        }),
    }
}

/// Whether condition `type_` is `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// An Event note within the API server's limit of 1024 bytes.
pub fn event_note(s: String) -> String {
    const MAX: usize = 1024;
    if s.len() <= MAX {
        return s;
    }
    let mut cut = truncate(s, MAX - 3);
    cut.push('…');
    cut
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_notes_fit_the_api_limit() {
        let long = "é".repeat(2000);
        let note = event_note(long);
        assert!(note.len() <= 1024, "{}", note.len());
        assert!(note.ends_with('…'));
        assert_eq!(event_note("short".into()), "short");
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut c = Vec::new();
        set(&mut c, "Ready", false, "Starting", "", Some(1));
        let t0 = c[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        set(&mut c, "Ready", false, "Still", "msg", Some(2));
        assert_eq!(c[0].last_transition_time, t0);
        assert_eq!(c[0].reason, "Still");
        std::thread::sleep(std::time::Duration::from_millis(5));
        set(&mut c, "Ready", true, "Done", "", Some(2));
        assert_ne!(c[0].last_transition_time, t0);
        assert!(is_true(&c, "Ready"));
        assert_eq!(c.len(), 1);
    }
}
