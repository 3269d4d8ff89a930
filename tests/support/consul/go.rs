//! Go's parsers, as Consul applies them to query parameters: a client must send what Go accepts.

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.ParseUint(text, 10, 64)`: digits only, no sign, no spaces.
pub fn parse_go_uint(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Go's `time.ParseDuration`, in signed nanoseconds: `300ms`, `1.5h`, `1h2m3s`, `-5s`, `0`.
pub fn parse_go_duration(text: &str) -> Option<i128> {
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let whole_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (whole, after) = rest.split_at(whole_len);
        rest = after;
        let mut fraction = "";
        if let Some(after_dot) = rest.strip_prefix('.') {
            let fraction_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
            (fraction, rest) = after_dot.split_at(fraction_len);
        } else if whole.is_empty() {
            return None;
        }
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let unit_len = rest
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (unit, after_unit) = rest.split_at(unit_len);
        rest = after_unit;
        let unit: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        // Digits past the 18th cannot change a duration that fits in 64 bits.
        let fraction = &fraction[..fraction.len().min(18)];
        let fraction_ns = if fraction.is_empty() {
            0
        } else {
            let scale = 10u128.pow(u32::try_from(fraction.len()).ok()?);
            fraction.parse::<u128>().ok()? * unit / scale
        };
        total = total
            .checked_add(whole.checked_mul(unit)?)?
            .checked_add(fraction_ns)?;
        if total > 1 << 63 {
            return None;
        }
    }
    if !negative && total > (1 << 63) - 1 {
        return None;
    }
    let total = i128::try_from(total).ok()?;
    Some(if negative { -total } else { total })
}

/// Go's `time.ParseDuration`, with its error text: `time: invalid duration "x"`, `time: missing
/// unit in duration "5"`, `time: unknown unit "d" in duration "5d"` (Consul quotes them in its
/// own errors, e.g. `Session TTL 'x' invalid: ...`).
pub fn go_parse_duration(text: &str) -> Result<i64, String> {
    let invalid = || format!("time: invalid duration {}", go_time_quote(text));
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    const LIMIT: u64 = 1 << 63;
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let first = rest.as_bytes()[0];
        if !(first == b'.' || first.is_ascii_digit()) {
            return Err(invalid());
        }
        // `leadingInt`: an overflow is an invalid duration.
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let mut whole: u64 = 0;
        for digit in rest[..digits].bytes() {
            if whole > LIMIT / 10 {
                return Err(invalid());
            }
            whole = whole * 10 + u64::from(digit - b'0');
            if whole > LIMIT {
                return Err(invalid());
            }
        }
        rest = &rest[digits..];
        let before_point = digits > 0;
        // `leadingFraction`: past 63 bits it stops adding precision.
        let (mut fraction, mut scale, mut after_point) = (0u64, 1f64, false);
        if let Some(after) = rest.strip_prefix('.') {
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            let mut overflow = false;
            for digit in after[..digits].bytes() {
                if overflow || fraction > (LIMIT - 1) / 10 {
                    overflow = true;
                    continue;
                }
                let next = fraction * 10 + u64::from(digit - b'0');
                if next > LIMIT {
                    overflow = true;
                    continue;
                }
                fraction = next;
                scale *= 10.0;
            }
            after_point = digits > 0;
            rest = &after[digits..];
        }
        if !before_point && !after_point {
            return Err(invalid());
        }
        let unit_len = rest
            .bytes()
            .take_while(|b| *b != b'.' && !b.is_ascii_digit())
            .count();
        if unit_len == 0 {
            return Err(format!(
                "time: missing unit in duration {}",
                go_time_quote(text)
            ));
        }
        let (unit, after_unit) = rest.split_at(unit_len);
        rest = after_unit;
        let unit: u64 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => {
                return Err(format!(
                    "time: unknown unit {} in duration {}",
                    go_time_quote(unit),
                    go_time_quote(text)
                ))
            }
        };
        if whole > LIMIT / unit {
            return Err(invalid());
        }
        let mut value = whole * unit;
        if fraction > 0 {
            // Go's float64 arithmetic, truncated as Go converts it.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let part = (fraction as f64 * (unit as f64 / scale)) as u64;
            value += part;
            if value > LIMIT {
                return Err(invalid());
            }
        }
        total += value;
        if total > LIMIT {
            return Err(invalid());
        }
    }
    if negative {
        // -(1 << 63) is the one value that fits only when negative.
        return Ok(0i64.wrapping_sub_unsigned(total));
    }
    i64::try_from(total).map_err(|_| invalid())
}

/// `time.Duration.String()`: `0s`, `1.5µs`, `100ms`, `10s`, `1m30s`, `24h0m0s`.
pub fn go_duration_string(nanos: i64) -> String {
    if nanos == 0 {
        return "0s".to_string();
    }
    let sign = if nanos < 0 { "-" } else { "" };
    let u = nanos.unsigned_abs();
    // The digits of `value` below 10^precision, as `.123` without trailing zeros.
    let fraction = |value: u64, precision: u32| -> String {
        let digits = format!("{:0width$}", value, width = precision as usize);
        let digits = digits.trim_end_matches('0');
        if digits.is_empty() {
            String::new()
        } else {
            format!(".{digits}")
        }
    };
    if u < 1_000_000_000 {
        let (unit, precision) = match u {
            0..=999 => ("ns", 0),
            1_000..=999_999 => ("\u{b5}s", 3),
            _ => ("ms", 6),
        };
        let scale = 10u64.pow(precision);
        let frac = fraction(u % scale, precision);
        return format!("{sign}{}{frac}{unit}", u / scale);
    }
    let frac = fraction(u % 1_000_000_000, 9);
    let seconds = u / 1_000_000_000;
    let (hours, minutes, seconds) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    match (hours, minutes) {
        (0, 0) => format!("{sign}{seconds}{frac}s"),
        (0, _) => format!("{sign}{minutes}m{seconds}{frac}s"),
        _ => format!("{sign}{hours}h{minutes}m{seconds}{frac}s"),
    }
}

/// The `quote` of Go's `time` package: ASCII as it is (`"` and `\` escaped), every byte of
/// anything else as `\xNN`.
fn go_time_quote(text: &str) -> String {
    let mut quoted = String::from("\"");
    for c in text.chars() {
        if c.is_ascii() && c >= ' ' && c != '\u{7f}' {
            if c == '"' || c == '\\' {
                quoted.push('\\');
            }
            quoted.push(c);
        } else {
            let mut buffer = [0; 4];
            for byte in c.encode_utf8(&mut buffer).bytes() {
                quoted.push_str(&format!("\\x{byte:02x}"));
            }
        }
    }
    quoted.push('"');
    quoted
}

/// Go's `strconv.Quote` (what `%q` and `%#v` print for a string), for ASCII: control
/// characters escaped; other characters are kept as they are (Go keeps the printable ones).
pub fn go_quote(text: &str) -> String {
    let mut quoted = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\u{7}' => quoted.push_str("\\a"),
            '\u{8}' => quoted.push_str("\\b"),
            '\u{c}' => quoted.push_str("\\f"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            '\u{b}' => quoted.push_str("\\v"),
            c if c < ' ' || c == '\u{7f}' => quoted.push_str(&format!("\\x{:02x}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// Go's `base64.StdEncoding.DecodeString` (what `encoding/json` applies to a string decoded
/// into a `[]byte`): padding required, `\r` and `\n` skipped anywhere, non-zero trailing bits
/// accepted. The `Err` is the offset of Go's `CorruptInputError` ("illegal base64 data at input
/// byte N"), found where Go's `decodeQuantum` finds it.
pub fn go_base64_decode(src: &[u8]) -> Result<Vec<u8>, usize> {
    fn sextet(byte: u8) -> Option<u8> {
        match byte {
            b'A'..=b'Z' => Some(byte - b'A'),
            b'a'..=b'z' => Some(byte - b'a' + 26),
            b'0'..=b'9' => Some(byte - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let newline = |byte: u8| byte == b'\n' || byte == b'\r';
    let mut out = Vec::with_capacity(src.len() / 4 * 3);
    let mut si = 0;
    // One `decodeQuantum` per turn.
    while si < src.len() {
        let mut quantum = [0u8; 4];
        let mut len = 4;
        let mut j = 0;
        let mut trailing_garbage = None;
        while j < 4 {
            if si == src.len() {
                // Input ended: between quanta (after newlines) it is the end; inside one it is
                // corrupt, StdEncoding pads.
                return if j == 0 { Ok(out) } else { Err(si - j) };
            }
            let byte = src[si];
            si += 1;
            if let Some(value) = sextet(byte) {
                quantum[j] = value;
                j += 1;
                continue;
            }
            if newline(byte) {
                continue;
            }
            if byte != b'=' {
                return Err(si - 1);
            }
            // Padding: the end of the input.
            match j {
                0 | 1 => return Err(si - 1),
                2 => {
                    // "==" is expected, the first "=" is consumed.
                    while si < src.len() && newline(src[si]) {
                        si += 1;
                    }
                    if si == src.len() {
                        return Err(src.len());
                    }
                    if src[si] != b'=' {
                        return Err(si - 1);
                    }
                    si += 1;
                }
                _ => {}
            }
            while si < src.len() && newline(src[si]) {
                si += 1;
            }
            if si < src.len() {
                trailing_garbage = Some(si);
            }
            len = j;
            break;
        }
        let value = quantum
            .iter()
            .fold(0u32, |value, sextet| value << 6 | u32::from(*sextet));
        let bytes = value.to_be_bytes();
        out.extend_from_slice(&bytes[1..len]);
        if let Some(at) = trailing_garbage {
            return Err(at);
        }
    }
    Ok(out)
}

/// How Go's `UnmarshalTypeError` names a JSON value.
pub fn go_json_kind(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
