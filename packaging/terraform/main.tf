# An autoscaling group whose instances bootstrap themselves: the launch template's user_data
# installs the agent (pinned sha256) and runs `bootstrap init`; the instance role lets the
# agent read the role bundle, its instance's tags, other instances' state (lock reap) and its
# SSM secrets. The Name tag `${var.env}-${var.service}` picks the bundle and the role.
#
# Lifecycle (docs/asg.md): a launching hook keeps each new instance in Pending:Wait (out of
# its load balancer) until `bootstrap init` has converged it and its [[asg.health]] checks
# pass (CONTINUE), or abandons it at the first-boot deadline so the group replaces it; a
# terminating hook gives `bootstrap watch` the time to drain a node being scaled in.

terraform {
  required_version = ">= 1.3"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

locals {
  name = "${var.env}-${var.service}"
  # replace(), not templatefile(): the script stays a plain POSIX shell script.
  # The node's status record for the fleet view without etcd ([report] s3), when a bucket is given.
  report_s3 = var.report_bucket == "" ? "" : "s3://${var.report_bucket}/${var.report_prefix}/$${env}/$${service}/$${instance_id}.json"
  user_data = replace(replace(replace(replace(replace(file("${path.module}/../user-data.sh"),
    "@BOOTSTRAP_URL@", var.bootstrap_url),
    "@BOOTSTRAP_SHA256@", var.bootstrap_sha256),
    "@BOOTSTRAP_BUNDLE@", "s3://${var.bundle_bucket}/roles-$${env}.tar.gz"),
    "@BOOTSTRAP_ASG@", "true"),
  "@BOOTSTRAP_REPORT_S3@", local.report_s3)
}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "node" {
  name               = "${local.name}-bootstrap"
  assume_role_policy = data.aws_iam_policy_document.assume.json
}

data "aws_iam_policy_document" "agent" {
  # The environment's role bundle (and its .minisig when bundles are signed).
  statement {
    sid       = "ReadRoleBundle"
    actions   = ["s3:GetObject"]
    resources = ["arn:aws:s3:::${var.bundle_bucket}/roles-${var.env}.tar.gz*"]
  }
  # Naming from the Name tag when instance-metadata tags are off; lock reap and rollout reap
  # (DescribeInstanceStatus, and DescribeRegions to look for an id this region does not know;
  # DescribeInstances for agents older than that, for one release).
  statement {
    sid       = "DescribeForNamingAndReap"
    actions   = ["ec2:DescribeTags", "ec2:DescribeInstanceStatus", "ec2:DescribeRegions", "ec2:DescribeInstances"]
    resources = ["*"]
  }
  # secret("ssm:/…") in templates, with decryption.
  statement {
    sid       = "ReadSecrets"
    actions   = ["ssm:GetParameter"]
    resources = ["arn:aws:ssm:${var.region}:${var.account_id}:parameter/${var.env}/*", "arn:aws:ssm:${var.region}:${var.account_id}:parameter/kube/${var.env}/*"]
  }
  # The Auto Scaling lifecycle of this group's instances: heartbeats and the result of the
  # launch and terminating actions, Unhealthy after unhealthy_after failed runs.
  statement {
    sid     = "LifecycleOfThisGroup"
    actions = ["autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat", "autoscaling:SetInstanceHealth"]
    resources = [
      "arn:aws:autoscaling:${var.region}:${var.account_id}:autoScalingGroup:*:autoScalingGroupName/${local.name}",
    ]
  }
  # Finding the hooks (and, for max_unhealthy = "N%" without etcd, the group's size and health).
  statement {
    sid       = "DescribeLifecycle"
    actions   = ["autoscaling:DescribeLifecycleHooks", "autoscaling:DescribeAutoScalingGroups"]
    resources = ["*"]
  }
  statement {
    sid       = "DecryptSecrets"
    actions   = ["kms:Decrypt"]
    resources = [var.ssm_kms_key_arn]
  }
  # The node's status record ([report] s3): written under this group's env/service only.
  dynamic "statement" {
    for_each = var.report_bucket == "" ? [] : [var.report_bucket]
    content {
      sid       = "PutNodeRecord"
      actions   = ["s3:PutObject"]
      resources = ["arn:aws:s3:::${var.report_bucket}/${var.report_prefix}/${var.env}/${var.service}/*"]
    }
  }
}

# For operators (attach to their role or group): `bootstrap fleet status --source
# s3://REPORT_BUCKET/REPORT_PREFIX/` lists and reads the node records.
data "aws_iam_policy_document" "fleet_view" {
  statement {
    sid       = "ListNodeRecords"
    actions   = ["s3:ListBucket"]
    resources = ["arn:aws:s3:::${var.report_bucket}"]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.report_prefix}/*"]
    }
  }
  statement {
    sid       = "ReadNodeRecords"
    actions   = ["s3:GetObject"]
    resources = ["arn:aws:s3:::${var.report_bucket}/${var.report_prefix}/*"]
  }
}

resource "aws_iam_policy" "fleet_view" {
  count       = var.report_bucket == "" ? 0 : 1
  name        = "${local.name}-fleet-view"
  description = "bootstrap fleet status --source s3://${var.report_bucket}/${var.report_prefix}/"
  policy      = data.aws_iam_policy_document.fleet_view.json
}

output "fleet_view_policy_arn" {
  description = "The operators' policy for the fleet view in S3 (null without report_bucket)."
  value       = one(aws_iam_policy.fleet_view[*].arn)
}

resource "aws_iam_role_policy" "agent" {
  name   = "bootstrap-agent"
  role   = aws_iam_role.node.id
  policy = data.aws_iam_policy_document.agent.json
}

resource "aws_iam_instance_profile" "node" {
  name = "${local.name}-bootstrap"
  role = aws_iam_role.node.name
}

resource "aws_launch_template" "node" {
  name_prefix   = "${local.name}-"
  image_id      = var.ami_id
  instance_type = var.instance_type
  user_data     = base64encode(local.user_data)

  iam_instance_profile {
    arn = aws_iam_instance_profile.node.arn
  }

  # IMDSv2 only (the agent speaks nothing else), with tags in metadata so naming needs no API call.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "enabled"
  }

  tag_specifications {
    resource_type = "instance"
    tags = {
      Name = local.name
    }
  }
}

resource "aws_autoscaling_group" "nodes" {
  name                = local.name
  min_size            = var.min_size
  max_size            = var.max_size
  desired_capacity    = var.desired_capacity
  vpc_zone_identifier = var.subnet_ids
  health_check_type   = "EC2"
  # SetInstanceHealth from unhealthy_after respects this (ShouldRespectGracePeriod).
  health_check_grace_period = var.first_boot_deadline_seconds

  # New instances wait in Pending:Wait until init completes this with CONTINUE; no answer by the
  # timeout (init heartbeats well inside it) abandons the instance.
  initial_lifecycle_hook {
    name                 = "launch"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_LAUNCHING"
    heartbeat_timeout    = var.lifecycle_heartbeat_timeout
    default_result       = "ABANDON"
  }

  # Instances being scaled in wait in Terminating:Wait while bootstrap watch drains them.
  initial_lifecycle_hook {
    name                 = "drain"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    heartbeat_timeout    = var.lifecycle_heartbeat_timeout
    default_result       = "CONTINUE"
  }

  launch_template {
    id      = aws_launch_template.node.id
    version = aws_launch_template.node.latest_version
  }

  tag {
    key                 = "Name"
    value               = local.name
    propagate_at_launch = true
  }
}
