//! UPnP IGD port mapping, the pure part: the device description's WAN connection service, the
//! SOAP requests `AddPortMapping` / `DeletePortMapping` / `GetExternalIPAddress`, and their HTTP
//! responses. Every parser takes hostile bytes from the LAN: sizes are bounded by the caller
//! ([`MAX_HTTP_RESPONSE`]) and nothing here panics on any input.
//!
//! Only the default gateway is ever contacted: a LOCATION or control URL whose host is not the
//! gateway's address is refused ([`http_target`]).

use std::net::Ipv4Addr;

/// Largest HTTP response read from the gateway (description or SOAP answer); longer is refused.
pub const MAX_HTTP_RESPONSE: usize = 64 * 1024;

/// The WAN connection services that map ports, most capable first.
const SERVICES: [&str; 3] = [
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
];

/// `http://HOST[:PORT]/PATH` -> (port, path) when HOST is `gateway`; relative paths (`/x`) are
/// taken against `base_port`. Anything else (another host, https, garbage) is `None`.
pub fn http_target(url: &str, gateway: Ipv4Addr, base_port: u16) -> Option<(u16, String)> {
    let url = url.trim();
    if url.len() > 512 {
        return None;
    }
    if url.starts_with('/') {
        return Some((base_port, url.to_owned()));
    }
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse::<u16>().ok()?),
        None => (authority, 80),
    };
    if host.parse::<Ipv4Addr>().ok()? != gateway || port == 0 {
        return None;
    }
    Some((port, path.to_owned()))
}

/// The first WAN connection service of a device description: (service type, control URL).
pub fn parse_description(xml: &str) -> Option<(&'static str, String)> {
    for wanted in SERVICES {
        let mut rest = xml;
        while let Some(start) = rest.find("<service>") {
            let after = &rest[start + "<service>".len()..];
            let end = after.find("</service>")?;
            let service = &after[..end];
            if element(service, "serviceType").as_deref() == Some(wanted) {
                if let Some(control) = element(service, "controlURL") {
                    return Some((wanted, control));
                }
            }
            rest = &after[end..];
        }
    }
    None
}

/// The trimmed text of the first `<tag>...</tag>` (namespace prefixes allowed: `<m:tag>`).
pub fn element(text: &str, tag: &str) -> Option<String> {
    let mut rest = text;
    loop {
        let open = rest.find('<')?;
        let after = &rest[open + 1..];
        let close = after.find('>')?;
        let name = &after[..close];
        let local = name.rsplit(':').next().unwrap_or(name);
        if local == tag && !name.starts_with('/') {
            let body = &after[close + 1..];
            let end = body.find("</")?;
            return Some(body[..end].trim().chars().take(256).collect());
        }
        rest = &after[close + 1..];
    }
}

/// An HTTP/1.1 GET of `path` on the gateway.
pub fn http_get(gateway: Ipv4Addr, port: u16, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {gateway}:{port}\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

/// A SOAP POST of `action` of `service` with `args` (name, value) to `path` on the gateway.
pub fn soap_request(
    gateway: Ipv4Addr,
    port: u16,
    path: &str,
    service: &str,
    action: &str,
    args: &[(&str, String)],
) -> Vec<u8> {
    let mut body = format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
         <u:{action} xmlns:u=\"{service}\">"
    );
    for (name, value) in args {
        body.push_str(&format!("<{name}>{value}</{name}>"));
    }
    body.push_str(&format!("</u:{action}></s:Body></s:Envelope>\r\n"));
    format!(
        "POST {path} HTTP/1.1\r\nHost: {gateway}:{port}\r\nConnection: close\r\n\
         Content-Type: text/xml; charset=\"utf-8\"\r\nContent-Length: {}\r\n\
         SOAPAction: \"{service}#{action}\"\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `AddPortMapping` of UDP `external_port` to `client:internal_port` for `lease` seconds.
pub fn add_port_mapping(
    external_port: u16,
    internal_port: u16,
    client: Ipv4Addr,
    lease: u32,
) -> Vec<(&'static str, String)> {
    vec![
        ("NewRemoteHost", String::new()),
        ("NewExternalPort", external_port.to_string()),
        ("NewProtocol", "UDP".to_owned()),
        ("NewInternalPort", internal_port.to_string()),
        ("NewInternalClient", client.to_string()),
        ("NewEnabled", "1".to_owned()),
        ("NewPortMappingDescription", "peer".to_owned()),
        ("NewLeaseDuration", lease.to_string()),
    ]
}

/// `DeletePortMapping` of UDP `external_port`.
pub fn delete_port_mapping(external_port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("NewRemoteHost", String::new()),
        ("NewExternalPort", external_port.to_string()),
        ("NewProtocol", "UDP".to_owned()),
    ]
}

/// An HTTP response: (status code, body). `None` when it is not one.
pub fn parse_http_response(data: &[u8]) -> Option<(u16, String)> {
    if data.len() > MAX_HTTP_RESPONSE {
        return None;
    }
    let text = String::from_utf8_lossy(data);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    let mut parts = status.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?.parse::<u16>().ok()?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Some((code, body))
}

/// The body of a chunked transfer.
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// The UPnP error code of a SOAP fault (`<errorCode>718</errorCode>`).
pub fn soap_error(body: &str) -> Option<u32> {
    element(body, "errorCode")?.parse().ok()
}

/// UPnP error: the external port is mapped to another client.
pub const CONFLICT_IN_MAPPING_ENTRY: u32 = 718;
/// UPnP error: the gateway only supports permanent leases (lease 0).
pub const ONLY_PERMANENT_LEASES: u32 = 725;

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);

    #[test]
    fn urls_are_only_the_gateways() {
        assert_eq!(
            http_target("http://10.0.1.1:5000/rootDesc.xml", GW, 0),
            Some((5000, "/rootDesc.xml".into()))
        );
        assert_eq!(
            http_target("http://10.0.1.1", GW, 0),
            Some((80, "/".into()))
        );
        assert_eq!(
            http_target("/ctl/IPConn", GW, 5000),
            Some((5000, "/ctl/IPConn".into()))
        );
        for bad in [
            "http://10.0.1.9:5000/x",
            "http://evil.example/x",
            "https://10.0.1.1/x",
            "http://10.0.1.1:0/x",
            "http://10.0.1.1:99999/x",
            "ftp://10.0.1.1/",
            "",
        ] {
            assert_eq!(http_target(bad, GW, 80), None, "{bad}");
        }
        assert_eq!(http_target(&format!("/{}", "a".repeat(600)), GW, 80), None);
    }

    #[test]
    fn description_gives_the_wan_service() {
        let xml = "<root><device><serviceList>\
            <service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>\
            <controlURL>/ctl/L3F</controlURL></service>\
            <service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>\
            <serviceId>x</serviceId><controlURL> /ctl/IPConn </controlURL></service>\
            </serviceList></device></root>";
        assert_eq!(
            parse_description(xml),
            Some((
                "urn:schemas-upnp-org:service:WANIPConnection:1",
                "/ctl/IPConn".to_owned()
            ))
        );
        assert_eq!(parse_description("<root></root>"), None);
        assert_eq!(parse_description("<service><serviceType>"), None);
        assert_eq!(parse_description("\u{0}<<<>>></service><service>"), None);
    }

    #[test]
    fn soap_round_trip() {
        let request = soap_request(
            GW,
            5000,
            "/ctl/IPConn",
            SERVICES[1],
            "AddPortMapping",
            &add_port_mapping(4000, 4000, Ipv4Addr::new(10, 0, 1, 2), 3600),
        );
        let text = String::from_utf8(request).unwrap();
        assert!(text.starts_with("POST /ctl/IPConn HTTP/1.1\r\nHost: 10.0.1.1:5000\r\n"));
        assert!(text.contains(
            "SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping\""
        ));
        assert!(text.contains("<NewInternalClient>10.0.1.2</NewInternalClient>"));
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));

        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n\r\n<s:Envelope><s:Body>\
            <u:GetExternalIPAddressResponse><NewExternalIPAddress>203.0.113.21\
            </NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>";
        let (code, body) = parse_http_response(ok).unwrap();
        assert_eq!(code, 200);
        assert_eq!(
            element(&body, "NewExternalIPAddress").as_deref(),
            Some("203.0.113.21")
        );
        let fault = b"HTTP/1.1 500 Internal Server Error\r\n\r\n<s:Fault><detail><UPnPError>\
            <errorCode>718</errorCode></UPnPError></detail></s:Fault>";
        let (code, body) = parse_http_response(fault).unwrap();
        assert_eq!(code, 500);
        assert_eq!(soap_error(&body), Some(CONFLICT_IN_MAPPING_ENTRY));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        assert_eq!(parse_http_response(chunked).unwrap().1, "hello world");
    }

    #[test]
    fn malformed_http_is_refused() {
        for bad in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\n",
            b"SSH-2.0\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffff\r\nab",
        ] {
            assert_eq!(parse_http_response(bad), None, "{bad:?}");
        }
        let mut huge = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        huge.resize(MAX_HTTP_RESPONSE + 1, b'a');
        assert_eq!(parse_http_response(&huge), None);
        assert_eq!(soap_error("<errorCode>x</errorCode>"), None);
        assert_eq!(element("<a>unterminated", "a"), None);
    }
}
