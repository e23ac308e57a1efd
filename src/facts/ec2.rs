//! Instance tags from the EC2 API (`ec2:DescribeTags` with the instance role), for instances
//! that do not expose tags in instance metadata.

use anyhow::{Context, Result};
use std::collections::BTreeMap;

pub fn describe_tags(region: Option<&str>, endpoint: Option<&str>, instance_id: &str) -> Result<BTreeMap<String, String>> {
    let shared = crate::aws::sdk_config(region);
    let mut b = aws_sdk_ec2::config::Builder::from(&shared);
    if let Some(e) = endpoint {
        b = b.endpoint_url(e);
    }
    let client = aws_sdk_ec2::Client::from_conf(b.build());
    let filter = aws_sdk_ec2::types::Filter::builder().name("resource-id").values(instance_id).build();
    let mut tags = BTreeMap::new();
    let mut token: Option<String> = None;
    loop {
        let resp = crate::aws::runtime()
            .block_on(client.describe_tags().filters(filter.clone()).set_next_token(token.clone()).send())
            .map_err(|e| anyhow::anyhow!("{}", aws_sdk_ec2::error::DisplayErrorContext(&e)))
            .with_context(|| format!("ec2:DescribeTags for {instance_id}"))?;
        for t in resp.tags() {
            if let (Some(k), Some(v)) = (t.key(), t.value()) {
                tags.insert(k.to_string(), v.to_string());
            }
        }
        token = resp.next_token().map(str::to_string);
        if token.is_none() {
            return Ok(tags);
        }
    }
}
