//! The Auto Scaling API calls the lifecycle needs, through the shared AWS runtime and
//! credential chain (`crate::aws`): DescribeLifecycleHooks, RecordLifecycleActionHeartbeat,
//! CompleteLifecycleAction, SetInstanceHealth, DescribeAutoScalingGroups.

use anyhow::{anyhow, Result};
use aws_sdk_autoscaling::error::DisplayErrorContext;
use std::time::Duration;

pub const LAUNCHING: &str = "autoscaling:EC2_INSTANCE_LAUNCHING";
pub const TERMINATING: &str = "autoscaling:EC2_INSTANCE_TERMINATING";
/// A hook's heartbeat timeout when the API does not say (the AWS default).
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3600);

/// A lifecycle hook of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub name: String,
    pub transition: String,
    pub heartbeat_timeout: Duration,
}

/// This instance in its group: what every call names.
#[derive(Clone)]
pub struct Client {
    inner: aws_sdk_autoscaling::Client,
    pub group: String,
    pub instance_id: String,
}

fn err<E: std::error::Error + 'static>(what: String, e: E) -> anyhow::Error {
    anyhow!("autoscaling:{what}: {}", DisplayErrorContext(e))
}

impl Client {
    pub fn new(region: Option<&str>, endpoint: Option<&str>, group: &str, instance_id: &str) -> Client {
        let shared = crate::aws::sdk_config(region);
        let mut b = aws_sdk_autoscaling::config::Builder::from(&shared);
        if let Some(e) = endpoint {
            b = b.endpoint_url(e);
        }
        Client {
            inner: aws_sdk_autoscaling::Client::from_conf(b.build()),
            group: group.to_string(),
            instance_id: instance_id.to_string(),
        }
    }

    /// The group's lifecycle hooks.
    pub fn hooks(&self) -> Result<Vec<Hook>> {
        let r = crate::aws::runtime()
            .block_on(self.inner.describe_lifecycle_hooks().auto_scaling_group_name(&self.group).send())
            .map_err(|e| err(format!("DescribeLifecycleHooks {}", self.group), e))?;
        Ok(r.lifecycle_hooks()
            .iter()
            .filter_map(|h| {
                Some(Hook {
                    name: h.lifecycle_hook_name()?.to_string(),
                    transition: h.lifecycle_transition().unwrap_or_default().to_string(),
                    heartbeat_timeout: h
                        .heartbeat_timeout()
                        .filter(|t| *t > 0)
                        .map(|t| Duration::from_secs(t as u64))
                        .unwrap_or(DEFAULT_HEARTBEAT_TIMEOUT),
                })
            })
            .collect())
    }

    pub fn heartbeat(&self, hook: &str) -> Result<()> {
        crate::aws::runtime()
            .block_on(
                self.inner
                    .record_lifecycle_action_heartbeat()
                    .auto_scaling_group_name(&self.group)
                    .lifecycle_hook_name(hook)
                    .instance_id(&self.instance_id)
                    .send(),
            )
            .map_err(|e| err(format!("RecordLifecycleActionHeartbeat {hook}"), e))?;
        Ok(())
    }

    /// `result`: `CONTINUE` or `ABANDON`.
    pub fn complete(&self, hook: &str, result: &str) -> Result<()> {
        crate::aws::runtime()
            .block_on(
                self.inner
                    .complete_lifecycle_action()
                    .auto_scaling_group_name(&self.group)
                    .lifecycle_hook_name(hook)
                    .instance_id(&self.instance_id)
                    .lifecycle_action_result(result)
                    .send(),
            )
            .map_err(|e| err(format!("CompleteLifecycleAction {hook} {result}"), e))?;
        Ok(())
    }

    /// SetInstanceHealth Unhealthy, respecting the group's health check grace period (a node
    /// still inside it is not replaced for this).
    pub fn set_unhealthy(&self) -> Result<()> {
        crate::aws::runtime()
            .block_on(
                self.inner
                    .set_instance_health()
                    .instance_id(&self.instance_id)
                    .health_status("Unhealthy")
                    .should_respect_grace_period(true)
                    .send(),
            )
            .map_err(|e| err(format!("SetInstanceHealth {}", self.instance_id), e))?;
        Ok(())
    }

    /// The group's desired capacity and the other instances already Unhealthy or on their
    /// way out (Terminating*).
    pub fn unhealthy_others(&self) -> Result<(u32, u32)> {
        let r = crate::aws::runtime()
            .block_on(self.inner.describe_auto_scaling_groups().auto_scaling_group_names(&self.group).send())
            .map_err(|e| err(format!("DescribeAutoScalingGroups {}", self.group), e))?;
        let g = r
            .auto_scaling_groups()
            .first()
            .ok_or_else(|| anyhow!("autoscaling:DescribeAutoScalingGroups: no group {}", self.group))?;
        let size = g.desired_capacity().unwrap_or(0).max(0) as u32;
        let bad = g
            .instances()
            .iter()
            .filter(|i| i.instance_id() != Some(self.instance_id.as_str()))
            .filter(|i| {
                i.health_status().is_some_and(|h| h.eq_ignore_ascii_case("unhealthy"))
                    || i.lifecycle_state().is_some_and(|s| s.as_str().starts_with("Terminating"))
            })
            .count() as u32;
        Ok((size, bad))
    }
}

/// The hook of `transition` to use: the one named (it must exist), else the group's only one.
pub fn pick_hook(hooks: &[Hook], transition: &str, named: Option<&str>) -> Result<Option<Hook>> {
    if let Some(n) = named {
        return match hooks.iter().find(|h| h.name == n) {
            Some(h) if h.transition == transition => Ok(Some(h.clone())),
            Some(h) => Err(anyhow!("lifecycle hook {n} is for {}, not {transition}", h.transition)),
            None => Err(anyhow!(
                "no lifecycle hook {n} in the group (it has: {})",
                hooks.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", ")
            )),
        };
    }
    let of: Vec<&Hook> = hooks.iter().filter(|h| h.transition == transition).collect();
    match of.as_slice() {
        [] => Ok(None),
        [h] => Ok(Some((*h).clone())),
        many => Err(anyhow!(
            "the group has {} hooks for {transition} ({}): name one in [asg]",
            many.len(),
            many.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_are_picked_by_name_or_transition() {
        let h = |n: &str, t: &str| Hook {
            name: n.into(),
            transition: t.into(),
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
        };
        let hooks = [h("up", LAUNCHING), h("down", TERMINATING)];
        assert_eq!(pick_hook(&hooks, LAUNCHING, None).unwrap().unwrap().name, "up");
        assert_eq!(pick_hook(&hooks, TERMINATING, None).unwrap().unwrap().name, "down");
        assert_eq!(pick_hook(&hooks, LAUNCHING, Some("up")).unwrap().unwrap().name, "up");
        assert!(pick_hook(&hooks, LAUNCHING, Some("down"))
            .unwrap_err()
            .to_string()
            .contains("not autoscaling:EC2_INSTANCE_LAUNCHING"));
        assert!(pick_hook(&hooks, LAUNCHING, Some("x")).unwrap_err().to_string().contains("no lifecycle hook x"));
        assert_eq!(pick_hook(&hooks[1..], LAUNCHING, None).unwrap(), None);
        let two = [h("a", LAUNCHING), h("b", LAUNCHING)];
        assert!(pick_hook(&two, LAUNCHING, None).unwrap_err().to_string().contains("name one"));
    }
}
