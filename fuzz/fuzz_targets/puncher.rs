//! The hole puncher (`punch::Puncher`) in either role, driven by a script of time steps, sends,
//! genuine probes and answers (made with the introduction's key), forged ones (a guessed key or
//! none, in the peer's name, answering probes seen on the wire), answers to probes never sent and
//! arbitrary bytes, from a pool of IPv4 and IPv6 addresses.
//!
//! `punch::script::check_puncher_script` returns an error naming the property broken: a direct
//! path only to an address whose probe got a genuine answer; datagrams only to the candidates
//! and to sources of genuine probes; at most `max_probes` probes and `max_answers` answers; at
//! most a few events about forgeries, and every forgery counted.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = punch::script::check_puncher_script(data) {
        panic!("{broken}");
    }
});
