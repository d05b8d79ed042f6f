//! The relay hub: a sender's relay stream through `rendezvous::relay::RelaySession` (decode,
//! consent, per-peer token bucket and quota, minimum frame cost, packets held until an accept,
//! per-destination batches) into byte-bounded destination queues, driven by a script of
//! operations: raw bytes from the stream, well-formed frames, time passing, permission answers
//! changing (allowed, awaiting accept, denied), destinations draining their queues.
//!
//! `run_script` panics if a bound breaks: after every operation the session holds at most
//! `RelaySession::MEMORY_BOUND` bytes and every destination queue at most its byte limit (the
//! script format is documented on `run_script`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rendezvous::relay::run_script(data));
