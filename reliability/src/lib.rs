//! Reliability scenarios (see tests/).
