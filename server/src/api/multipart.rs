//! A small `multipart/form-data` reader (RFC 7578) for the one upload route, `POST /v1/files`:
//! the body is already whole in memory (the body guard read it under its size limit), so the
//! parts are found by splitting on the boundary; each part's `Content-Disposition` gives its
//! field `name` and, for a file, its `filename`. Binary content is kept byte for byte.
//! Owns: that parsing; every malformed body is a 400. Must not: decide what the fields mean.

use super::error::{ApiError, ApiResult};

/// One part of the form.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub data: Vec<u8>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::invalid("file", message)
}

/// The `boundary` parameter of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> ApiResult<String> {
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    if essence != "multipart/form-data" {
        return Err(bad("upload the file as multipart/form-data with fields `file` and `purpose`"));
    }
    parts
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .filter(|b| !b.is_empty() && b.len() <= 200)
        .ok_or_else(|| bad("the multipart content type has no boundary"))
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from > hay.len() {
        return None;
    }
    hay[from..].windows(needle.len()).position(|w| w == needle).map(|i| i + from)
}

/// The value of `key="..."` (or unquoted) in a header's parameters.
fn param(header: &str, key: &str) -> Option<String> {
    for p in header.split(';').skip(1) {
        let Some((k, v)) = p.trim().split_once('=') else { continue };
        if k.trim().eq_ignore_ascii_case(key) {
            let v = v.trim();
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
            return Some(v.replace("\\\"", "\""));
        }
    }
    None
}

/// Every part of `body`, in order.
pub fn parse(body: &[u8], boundary: &str) -> ApiResult<Vec<Part>> {
    let delim = format!("--{boundary}").into_bytes();
    let mut at = find(body, &delim, 0).ok_or_else(|| bad("the body has no multipart boundary"))? + delim.len();
    let next_delim = [b"\r\n".as_slice(), &delim].concat();
    let mut parts = Vec::new();
    loop {
        if body[at..].starts_with(b"--") {
            return Ok(parts);
        }
        let head_start = find(body, b"\r\n", at).ok_or_else(|| bad("a multipart part is cut short"))? + 2;
        let head_end = find(body, b"\r\n\r\n", head_start).ok_or_else(|| bad("a multipart part has no headers"))?;
        let end = find(body, &next_delim, head_end + 4).ok_or_else(|| bad("the multipart body does not end"))?;
        let head =
            std::str::from_utf8(&body[head_start..head_end]).map_err(|_| bad("multipart headers are not UTF-8"))?;
        let disposition = head
            .split("\r\n")
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))
            .ok_or_else(|| bad("a multipart part has no Content-Disposition"))?;
        let name = param(disposition, "name").ok_or_else(|| bad("a multipart part has no field name"))?;
        parts.push(Part { name, filename: param(disposition, "filename"), data: body[head_end + 4..end].to_vec() });
        if parts.len() > 16 {
            return Err(bad("too many multipart parts (the upload takes `file` and `purpose`)"));
        }
        at = end + next_delim.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_keep_binary_content() {
        let b = "XyZ";
        let mut body =
            format!("--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n").into_bytes();
        body.extend(format!("--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n").bytes());
        body.extend(b"Content-Type: application/octet-stream\r\n\r\n\x00\xff\r\n--X\r\n");
        body.extend(format!("\r\n--{b}--\r\n").bytes());
        let parts = parse(&body, b).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[0].name.as_str(), parts[0].data.as_slice()), ("purpose", b"assistants".as_slice()));
        assert_eq!(parts[1].filename.as_deref(), Some("a.bin"));
        assert_eq!(parts[1].data, b"\x00\xff\r\n--X\r\n");
        assert_eq!(boundary("multipart/form-data; boundary=\"XyZ\"").unwrap(), "XyZ");
        assert!(boundary("application/json").is_err());
        for broken in [&b"no boundary here"[..], b"--XyZ\r\nContent-Disposition: form-data\r\n\r\nx", b"--XyZ"] {
            assert!(parse(broken, b).is_err());
        }
    }
}
