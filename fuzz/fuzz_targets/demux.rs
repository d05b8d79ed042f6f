//! The socket demultiplexer's receive filter and routes: `transport::DemuxSocket` over a
//! scripted socket, driven by route changes (UDP routes, virtual paths, aliases, removals, with
//! IPv4, IPv6 and IPv4-mapped addresses), received batches with arbitrary GRO strides and
//! lengths (past the bytes copied, past the buffer, zero), STUN and QUIC segments mixed,
//! injected datagrams, sends, claims and releases of live connections' addresses.
//!
//! `check_receive_script` returns an error naming the property broken: quinn gets exactly the
//! non-STUN bytes, from the translated source; every STUN segment reaches the STUN channel in
//! order or is counted as dropped when it is full; sends go where the routes say; aliases are
//! taken or refused as the model says (claims, owners with routes, bounds); injected
//! datagrams all arrive. The same input also drives relay channels (`check_channel_script`):
//! bound channels' datagrams reach quinn unwrapped from the relayed peer, the forwarder sees
//! exactly its runs, sends are wrapped or take the relay sink, anything else is untouched.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = transport::check_receive_script(data) {
        panic!("{broken}");
    }
    // The same bytes as a relay channel script (see `check_channel_script`).
    if let Err(broken) = transport::check_channel_script(data) {
        panic!("{broken}");
    }
});
