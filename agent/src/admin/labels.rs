//! Label encoding shared by the metric families: values escaped as the exposition formats require.
use std::fmt::{self, Write as _};

use prometheus_client::encoding::{
    EncodeLabel, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
};

/// Writes `pairs` as labels, values escaped.
pub(super) fn encode_pairs(pairs: &[(&str, &str)], encoder: &mut LabelSetEncoder) -> fmt::Result {
    for (key, value) in pairs {
        EncodeLabel::encode(&(*key, Escaped(value)), encoder.encode_label())?;
    }
    Ok(())
}

/// A label value escaped as the exposition formats require (`\\`, `\"`, `\n`); the
/// prometheus-client text encoder writes values verbatim.
pub(super) struct Escaped<'a>(pub(super) &'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}
