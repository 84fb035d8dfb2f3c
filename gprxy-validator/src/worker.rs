//! The background worker that keeps every shared issuer's keys fresh: it refreshes a key set at
//! 80 % of its TTL and publishes it, so logins normally make no network call.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};

use crate::settings::Settings;

pub fn run() {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    pgrx::log!("gprxy: JWKS refresher started");
    let mut interval = Duration::from_secs(10);
    while BackgroundWorker::wait_latch(Some(interval)) {
        if BackgroundWorker::sighup_received() {
            crate::ffi::reload_config();
        }
        let settings = match Settings::current() {
            Ok(s) => s,
            Err(e) => {
                pgrx::warning!(
                    "gprxy: JWKS refresher idle, settings invalid: {}",
                    crate::settings::describe(&e)
                );
                continue;
            }
        };
        interval = settings.refresh_check_interval;
        for issuer in crate::shared::issuers() {
            let Ok(cache) = crate::login::cache_for(&settings, &issuer) else { continue };
            // Takes newer keys from shared memory first, publishes what it fetches.
            if cache.refresh_if_due() {
                pgrx::log!("gprxy: refreshed signing keys of issuer {}", gprxy_core::Quoted::new(&issuer));
            }
        }
    }
    pgrx::log!("gprxy: JWKS refresher stopped");
}
