//! Captures log records per test thread, to check what a guest can make Ember log.

use std::cell::RefCell;
use std::sync::Once;

thread_local! {
    static RECORDS: RefCell<Vec<(log::Level, String)>> = const { RefCell::new(Vec::new()) };
}

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        RECORDS.with(|r| {
            r.borrow_mut()
                .push((record.level(), record.args().to_string()))
        });
    }

    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

/// Starts capturing what this thread logs, from now on.
pub fn start() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        log::set_logger(&CAPTURE).expect("no other logger in unit tests");
        log::set_max_level(log::LevelFilter::Trace);
    });
    RECORDS.with(|r| r.borrow_mut().clear());
}

/// What this thread logged at warn level or above since `start`.
pub fn warnings() -> Vec<String> {
    RECORDS.with(|r| {
        r.borrow()
            .iter()
            .filter(|(level, _)| *level <= log::Level::Warn)
            .map(|(_, msg)| msg.clone())
            .collect()
    })
}
