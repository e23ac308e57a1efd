//! Reboot windows: `window_start = "Mon..Fri 02:00"` (days, then a UTC time) and
//! `window_length = "2h"`. Days are a range (`Mon..Fri`), a list (`Sat,Sun`), or `*`.

use time::{Duration, OffsetDateTime};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Allowed start days, Monday = 0.
    pub days: [bool; 7],
    pub start_minute: u32,
    pub length: Duration,
}

fn day(s: &str) -> Result<usize, String> {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    NAMES
        .iter()
        .position(|n| s.eq_ignore_ascii_case(n))
        .ok_or_else(|| format!("unknown day {s:?} (use Mon..Sun)"))
}

impl Window {
    pub fn parse(start: &str, length: &str) -> Result<Window, String> {
        let (days_s, time_s) = match start.trim().split_once(' ') {
            Some((d, t)) => (d.trim(), t.trim()),
            None => ("*", start.trim()),
        };
        let mut days = [false; 7];
        if days_s == "*" {
            days = [true; 7];
        } else {
            for part in days_s.split(',') {
                match part.split_once("..") {
                    Some((a, b)) => {
                        let (a, b) = (day(a)?, day(b)?);
                        let mut d = a;
                        loop {
                            days[d] = true;
                            if d == b {
                                break;
                            }
                            d = (d + 1) % 7;
                        }
                    }
                    None => days[day(part)?] = true,
                }
            }
        }
        let (h, m) = time_s.split_once(':').ok_or_else(|| format!("window time {time_s:?}: expected HH:MM"))?;
        let (h, m): (u32, u32) = (
            h.parse().map_err(|_| format!("bad hour in {time_s:?}"))?,
            m.parse().map_err(|_| format!("bad minute in {time_s:?}"))?,
        );
        if h > 23 || m > 59 {
            return Err(format!("window time {time_s:?} out of range"));
        }
        let len = humantime::parse_duration(length).map_err(|e| format!("window_length {length:?}: {e}"))?;
        if len.is_zero() || len > std::time::Duration::from_secs(7 * 86400) {
            return Err(format!("window_length {length:?} must be between 1s and 7 days"));
        }
        Ok(Window {
            days,
            start_minute: h * 60 + m,
            length: Duration::try_from(len).map_err(|e| e.to_string())?,
        })
    }

    /// Is `now` (UTC) inside a window that started on an allowed day?
    pub fn contains(&self, now: OffsetDateTime) -> bool {
        self.current(now).is_some()
    }

    /// The window `now` is in: its start and end (the latest end when windows overlap).
    pub fn current(&self, now: OffsetDateTime) -> Option<(OffsetDateTime, OffsetDateTime)> {
        let now = now.to_offset(time::UtcOffset::UTC);
        let midnight = now.replace_time(time::Time::MIDNIGHT);
        // Windows that started today or on one of the previous 7 days.
        (0..=7)
            .map(|back| midnight - Duration::days(back) + Duration::minutes(self.start_minute as i64))
            .filter(|start| self.days[start.weekday().number_days_from_monday() as usize] && *start <= now && now < *start + self.length)
            .map(|start| (start, start + self.length))
            .max_by_key(|(_, end)| *end)
    }

    /// This node's own start inside the window that began at `start`: a delay in
    /// `[0, splay)` drawn from the holder id and the window's start, so the fleet spreads over
    /// the window's beginning instead of stampeding the lock at its first second, and every run
    /// of one node agrees on its turn.
    pub fn node_start(start: OffsetDateTime, splay: std::time::Duration, holder: &str) -> OffsetDateTime {
        use sha2::{Digest, Sha256};
        if splay.is_zero() {
            return start;
        }
        let h = Sha256::digest(format!("{holder}@{}", start.unix_timestamp()));
        let n = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
        start + std::time::Duration::from_millis(n % splay.as_millis().max(1) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn windows() {
        let w = Window::parse("Mon..Fri 02:00", "2h").unwrap();
        // 2026-11-23 is a Monday.
        let cases = [
            (datetime!(2026-11-23 01:59 UTC), false),
            (datetime!(2026-11-23 02:00 UTC), true),
            (datetime!(2026-11-23 03:59 UTC), true),
            (datetime!(2026-11-23 04:00 UTC), false),
            (datetime!(2026-11-28 02:30 UTC), false), // Saturday
            (datetime!(2026-11-27 02:30 UTC), true),  // Friday
        ];
        for (t, want) in cases {
            assert_eq!(w.contains(t), want, "{t}");
        }
        // Crossing midnight, and wrapping day ranges.
        let w = Window::parse("Sat..Mon 23:00", "3h").unwrap();
        assert!(w.contains(datetime!(2026-11-29 01:30 UTC)), "Sunday 01:30 is in Saturday's window");
        assert!(w.contains(datetime!(2026-11-24 01:30 UTC)), "Tuesday 01:30 is in Monday's window");
        assert!(!w.contains(datetime!(2026-11-25 01:30 UTC)));
        let (s, e) = w.current(datetime!(2026-11-29 01:30 UTC)).unwrap();
        assert_eq!((s, e), (datetime!(2026-11-28 23:00 UTC), datetime!(2026-11-29 02:00 UTC)));
        let every = Window::parse("04:00", "30m").unwrap();
        assert!(every.contains(datetime!(2026-11-25 04:10 UTC)));
        for (s, l) in [
            ("Mon..Fry 02:00", "1h"),
            ("Mon 25:00", "1h"),
            ("Mon 02:00", "0s"),
            ("Mon 0200", "1h"),
            ("Mon 02:00", "8days"),
        ] {
            assert!(Window::parse(s, l).is_err(), "{s} {l}");
        }
    }

    #[test]
    fn node_starts_spread_over_the_splay_and_are_stable() {
        let start = datetime!(2026-11-23 02:00 UTC);
        let splay = std::time::Duration::from_secs(600);
        let offsets: Vec<i64> = (0..1000)
            .map(|i| (Window::node_start(start, splay, &format!("i-{i:017x}")) - start).whole_seconds())
            .collect();
        assert!(offsets.iter().all(|o| (0..600).contains(o)));
        // Roughly uniform: every minute of the splay gets some nodes, none gets most.
        for minute in 0..10 {
            let n = offsets.iter().filter(|o| **o / 60 == minute).count();
            assert!((50..=150).contains(&n), "minute {minute}: {n} nodes");
        }
        assert_eq!(Window::node_start(start, splay, "i-1"), Window::node_start(start, splay, "i-1"));
        assert_eq!(Window::node_start(start, std::time::Duration::ZERO, "i-1"), start);
    }
}
