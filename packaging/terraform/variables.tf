variable "env" {
  description = "Environment: picks the role bundle (roles-ENV.tar.gz)."
  type        = string
}

variable "service" {
  description = "Service: picks the role inside the bundle."
  type        = string
}

variable "region" {
  type = string
}

variable "account_id" {
  type = string
}

variable "bootstrap_url" {
  description = "https:// (or s3://) URL of the static bootstrap binary."
  type        = string
}

variable "bootstrap_sha256" {
  description = "sha256 of that binary; user_data refuses anything else."
  type        = string
  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.bootstrap_sha256))
    error_message = "bootstrap_sha256 must be 64 lowercase hex digits."
  }
}

variable "bundle_bucket" {
  description = "Bucket holding roles-ENV.tar.gz."
  type        = string
}

variable "report_bucket" {
  description = "Bucket for the nodes' status records ([report] s3, the fleet view without etcd); empty: none."
  type        = string
  default     = ""
}

variable "report_prefix" {
  description = "Key prefix of the status records in report_bucket (no slash at either end)."
  type        = string
  default     = "nodes"
}

variable "ssm_kms_key_arn" {
  description = "KMS key of the SecureString parameters the roles read."
  type        = string
}

variable "ami_id" {
  type = string
}

variable "instance_type" {
  type    = string
  default = "t3.small"
}

variable "subnet_ids" {
  type = list(string)
}

variable "min_size" {
  type    = number
  default = 2
}

variable "max_size" {
  type    = number
  default = 10
}

variable "desired_capacity" {
  type    = number
  default = 2
}

variable "lifecycle_heartbeat_timeout" {
  description = "Seconds a lifecycle action waits for a heartbeat (init and watch send one every quarter of it, at most every 5 minutes)."
  type        = number
  default     = 600
}

variable "first_boot_deadline_seconds" {
  description = "Health check grace period of new instances; keep it at least [asg] first_boot_deadline (default 30 minutes)."
  type        = number
  default     = 1800
}
