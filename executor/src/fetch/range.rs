//! Resuming: what a `206 Partial Content` answer must say before its bytes
//! are appended to what we already have.

/// A parsed `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    pub start: u64,
    pub end: u64,
    pub total: Option<u64>,
}

pub fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes")?;
    if !rest.starts_with(' ') {
        return None;
    }
    let (range, total) = rest.trim_start().split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let digits = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let (start, end) = (digits(start)?, digits(end)?);
    let total = match total {
        "*" => None,
        t => Some(digits(t)?),
    };
    if end < start || total.is_some_and(|t| end >= t) {
        return None;
    }
    Some(ContentRange { start, end, total })
}

/// Checks a 206 answer to `Range: bytes=OFFSET-`: it must carry exactly
/// the rest of the file we already know. Returns the file's total size.
pub(super) fn check_resume(
    header: Option<&str>,
    offset: u64,
    known_total: Option<u64>,
    content_length: Option<u64>,
) -> Result<Option<u64>, String> {
    let value = header.ok_or("a 206 answer without Content-Range")?;
    let range = parse_content_range(value).ok_or(format!("unreadable Content-Range {value:?}"))?;
    if range.start != offset {
        return Err(format!(
            "it starts at byte {}, we asked for byte {offset}",
            range.start
        ));
    }
    let total = range.total.or(known_total);
    if let (Some(known), Some(now)) = (known_total, range.total)
        && known != now
    {
        return Err(format!(
            "the file changed size on the server from {known} to {now}"
        ));
    }
    if let Some(total) = total
        && range.end + 1 != total
    {
        return Err(format!(
            "it sends bytes {}-{} of {total}, not the rest of the file",
            range.start, range.end
        ));
    }
    if let Some(len) = content_length
        && len != range.end - range.start + 1
    {
        return Err(format!(
            "Content-Length {len} disagrees with Content-Range {value:?}"
        ));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_as_servers_write_it() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some(ContentRange {
                start: 100,
                end: 199,
                total: Some(1000)
            })
        );
        assert_eq!(
            parse_content_range("bytes 0-0/*"),
            Some(ContentRange {
                start: 0,
                end: 0,
                total: None
            })
        );
        for bad in [
            "bytes */1000",
            "bytes 200-100/1000",
            "bytes 0-1000/1000",
            "items 0-1/2",
            "bytes=0-1/2",
            "bytes 0-1",
            "bytes -1-2/3",
            "bytes 0-+1/3",
            "",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn resume_answers_must_continue_where_we_stopped() {
        let ok = check_resume(Some("bytes 500-999/1000"), 500, Some(1000), Some(500));
        assert_eq!(ok, Ok(Some(1000)));
        assert_eq!(
            check_resume(Some("bytes 500-999/*"), 500, Some(1000), None),
            Ok(Some(1000))
        );
        let wrong_start = check_resume(Some("bytes 0-999/1000"), 500, Some(1000), None);
        assert!(wrong_start.unwrap_err().contains("starts at byte 0"));
        let changed = check_resume(Some("bytes 500-1999/2000"), 500, Some(1000), None);
        assert!(changed.unwrap_err().contains("changed size"));
        let short = check_resume(Some("bytes 500-599/1000"), 500, Some(1000), None);
        assert!(short.unwrap_err().contains("not the rest"));
        let length = check_resume(Some("bytes 500-999/1000"), 500, None, Some(10));
        assert!(length.unwrap_err().contains("Content-Length 10"));
        assert!(check_resume(None, 500, None, None).is_err());
    }
}
