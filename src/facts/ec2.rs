//! Instance tags from the EC2 API (`ec2:DescribeTags` with the instance role), for instances
//! that do not expose tags in instance metadata.

use anyhow::{Context, Result};
use std::collections::BTreeMap;

fn client(region: Option<&str>, endpoint: Option<&str>) -> aws_sdk_ec2::Client {
    let shared = crate::aws::sdk_config(region);
    let mut b = aws_sdk_ec2::config::Builder::from(&shared);
    if let Some(e) = endpoint {
        b = b.endpoint_url(e);
    }
    aws_sdk_ec2::Client::from_conf(b.build())
}

/// Is this instance gone (terminated, shutting down, or unknown to EC2)? Errors other than
/// "not found" are returned: an API failure must not look like a dead instance.
///
/// Asked with `ec2:DescribeInstanceStatus` (all instances, not only running ones): it answers
/// the state as `DescribeInstances` does, and its small output shape keeps the SDK's parser of
/// the full instance description (hundreds of fields) out of the binary.
pub fn instance_gone(region: Option<&str>, endpoint: Option<&str>, instance_id: &str) -> Result<bool> {
    let c = client(region, endpoint);
    let resp = crate::aws::runtime().block_on(c.describe_instance_status().instance_ids(instance_id).include_all_instances(true).send());
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            if e.as_service_error()
                .and_then(|se| aws_sdk_ec2::error::ProvideErrorMetadata::code(se))
                .is_some_and(|c| c.starts_with("InvalidInstanceID"))
            {
                return Ok(true);
            }
            return Err(anyhow::anyhow!(
                "ec2:DescribeInstanceStatus {instance_id}: {}",
                aws_sdk_ec2::error::DisplayErrorContext(&e)
            ));
        }
    };
    let states: Vec<String> = resp
        .instance_statuses()
        .iter()
        .filter_map(|i| i.instance_state().and_then(|s| s.name()).map(|n| n.as_str().to_string()))
        .collect();
    Ok(states.is_empty() || states.iter().all(|s| s == "terminated" || s == "shutting-down"))
}

pub fn describe_tags(region: Option<&str>, endpoint: Option<&str>, instance_id: &str) -> Result<BTreeMap<String, String>> {
    let client = client(region, endpoint);
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
