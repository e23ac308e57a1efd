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

/// What EC2 says of an instance a reap finds holding a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instance {
    /// Running, stopped, pending... in the region asked.
    Here,
    /// Alive, but in this other region (the region asked did not know it).
    In(String),
    /// Terminated or shutting down, or unknown to every region of the account.
    Gone,
}

/// Looks up instances for `lock reap` and `rollout reap`, asked with
/// `ec2:DescribeInstanceStatus` (all instances, not only running ones: it answers the state as
/// `DescribeInstances` does, and its small output shape keeps the SDK's parser of the full
/// instance description out of the binary).
///
/// An instance id the region asked does not know is looked for in the account's other enabled
/// regions (`ec2:DescribeRegions`) before it counts as gone: an operator whose AWS_REGION is not
/// the fleet's would otherwise see every live holder as unknown and take every slot. Errors are
/// returned, never read as a dead instance.
pub struct InstanceLookup {
    client: aws_sdk_ec2::Client,
    endpoint: Option<String>,
    others: Option<Vec<String>>,
    /// Answers already had (a holder of several rollout slots is asked about once).
    seen: BTreeMap<String, Instance>,
}

impl InstanceLookup {
    pub fn new(region: Option<&str>, endpoint: Option<&str>) -> InstanceLookup {
        InstanceLookup {
            client: client(region, endpoint),
            endpoint: endpoint.map(str::to_string),
            others: None,
            seen: BTreeMap::new(),
        }
    }

    pub fn find(&mut self, instance_id: &str) -> Result<Instance> {
        if let Some(i) = self.seen.get(instance_id) {
            return Ok(i.clone());
        }
        let found = self.ask(instance_id)?;
        self.seen.insert(instance_id.to_string(), found.clone());
        Ok(found)
    }

    fn ask(&mut self, instance_id: &str) -> Result<Instance> {
        let rt = crate::aws::runtime();
        let asked = self.client.config().region().map(|r| r.to_string());
        match rt.block_on(state_in(self.client.clone(), instance_id.to_string())) {
            Ok(Some(true)) => return Ok(Instance::Gone),
            Ok(Some(false)) => return Ok(Instance::Here),
            Ok(None) => {}
            Err(e) => {
                return Err(e.context(format!(
                    "ec2:DescribeInstanceStatus {instance_id} in {}",
                    asked.as_deref().unwrap_or("the default region")
                )))
            }
        }
        if self.others.is_none() {
            let resp = rt
                .block_on(self.client.describe_regions().send())
                .map_err(|e| anyhow::anyhow!("{}", aws_sdk_ec2::error::DisplayErrorContext(&e)))
                .with_context(|| {
                    format!(
                        "ec2:DescribeRegions (to look for {instance_id}, unknown to {}, in the other regions)",
                        asked.as_deref().unwrap_or("the default region")
                    )
                })?;
            let mut names: Vec<String> = resp.regions().iter().filter_map(|r| r.region_name().map(str::to_string)).collect();
            names.retain(|n| Some(n) != asked.as_ref());
            names.sort();
            self.others = Some(names);
        }
        // Every other region at once: a few dozen small requests.
        let handles: Vec<_> = self
            .others
            .iter()
            .flatten()
            .map(|r| {
                let c = client(Some(r), self.endpoint.as_deref());
                (r.clone(), rt.spawn(state_in(c, instance_id.to_string())))
            })
            .collect();
        let mut found = Instance::Gone;
        for (region, h) in handles {
            let state = rt
                .block_on(h)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .and_then(|r| r)
                .with_context(|| format!("ec2:DescribeInstanceStatus {instance_id} in {region}"))?;
            if state == Some(false) && found == Instance::Gone {
                found = Instance::In(region);
            }
        }
        Ok(found)
    }
}

/// One region's answer: None when it does not know the id, Some(true) when the instance is
/// terminated or shutting down, Some(false) when it is alive.
async fn state_in(c: aws_sdk_ec2::Client, instance_id: String) -> Result<Option<bool>> {
    let resp = match c.describe_instance_status().instance_ids(&instance_id).include_all_instances(true).send().await {
        Ok(r) => r,
        Err(e) => {
            if e.as_service_error()
                .and_then(|se| aws_sdk_ec2::error::ProvideErrorMetadata::code(se))
                .is_some_and(|c| c.starts_with("InvalidInstanceID"))
            {
                return Ok(None);
            }
            return Err(anyhow::anyhow!("{}", aws_sdk_ec2::error::DisplayErrorContext(&e)));
        }
    };
    let states: Vec<String> = resp
        .instance_statuses()
        .iter()
        .filter_map(|i| i.instance_state().and_then(|s| s.name()).map(|n| n.as_str().to_string()))
        .collect();
    if states.is_empty() {
        return Ok(None);
    }
    Ok(Some(states.iter().all(|s| s == "terminated" || s == "shutting-down")))
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
