# Inputs. Everything has a default except the ACM certificate, which only you can provide.

variable "name" {
  description = "Name prefix of every resource."
  type        = string
  default     = "ensemble"
}

variable "environment" {
  description = "Environment name, part of every resource name (prod, staging, …)."
  type        = string
  default     = "prod"
}

variable "region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "us-west-2"
}

variable "availability_zone_suffixes" {
  description = "The two availability zones (by letter) for the subnets, ElastiCache and the ALB."
  type        = list(string)
  default     = ["a", "b"]

  validation {
    condition     = length(var.availability_zone_suffixes) == 2
    error_message = "Give exactly two zones."
  }
}

variable "vpc_cidr" {
  description = "CIDR of the VPC; two public and two private /20 subnets are carved from it."
  type        = string
  default     = "10.20.0.0/16"
}

variable "certificate_arn" {
  description = "ACM certificate (same region) for the ALB's HTTPS listener."
  type        = string
}

# Required: the ECR repositories are immutable and nothing pushes a moving tag such as
# `latest`, so a default would name an image that does not exist. The buildspec prints
# the tag it pushed.
variable "image_tags" {
  description = "Image tag per service, as pushed to ECR by deploy/buildspec.yml (the commit's first 12 characters)."
  type        = map(string)

  validation {
    condition = alltrue([
      for s in ["master", "worker", "llm-gateway"] :
      try(var.image_tags[s], "") != "" && try(var.image_tags[s], "") != "latest"
    ])
    error_message = "image_tags needs master, worker and llm-gateway, each a tag pushed to ECR (not latest: the repositories are immutable)."
  }
}

variable "master_cpu" {
  description = "Master task CPU units (512 = 0.5 vCPU)."
  type        = number
  default     = 512
}

variable "master_memory" {
  description = "Master task memory, MiB."
  type        = number
  default     = 1024
}

variable "master_min_count" {
  description = "Fewest master tasks."
  type        = number
  default     = 1
}

variable "master_max_count" {
  description = "Most master tasks."
  type        = number
  default     = 3
}

variable "gateway_cpu" {
  description = "llm-gateway task CPU units."
  type        = number
  default     = 256
}

variable "gateway_memory" {
  description = "llm-gateway task memory, MiB."
  type        = number
  default     = 512
}

variable "gateway_count" {
  description = "llm-gateway tasks (it is stateless; two spread over both AZs)."
  type        = number
  default     = 2
}

variable "llm_provider" {
  description = "The gateway's default provider: bedrock (task role credentials), gemini (GEMINI_API_KEY secret) or mock."
  type        = string
  default     = "bedrock"

  validation {
    condition     = contains(["mock", "gemini", "bedrock"], var.llm_provider)
    error_message = "llm_provider must be mock, gemini or bedrock."
  }
}

variable "llm_model" {
  description = "The gateway's default model (empty: the gateway's built-in default for the provider)."
  type        = string
  default     = ""
}

variable "bedrock_model_arns" {
  description = "Bedrock foundation models and inference profiles the gateway may invoke."
  type        = list(string)
  default = [
    "arn:aws:bedrock:*::foundation-model/*",
    "arn:aws:bedrock:*:*:inference-profile/*",
  ]
}

variable "worker_groups" {
  description = "One worker service per capability: sizes, counts and MAX_CONCURRENCY (autoscaling aims at that many queued or running steps per task)."
  type = map(object({
    cpu             = number
    memory          = number
    min_count       = number
    max_count       = number
    max_concurrency = number
  }))
  default = {
    plan     = { cpu = 256, memory = 512, min_count = 1, max_count = 4, max_concurrency = 8 }
    retrieve = { cpu = 256, memory = 512, min_count = 1, max_count = 4, max_concurrency = 8 }
    evaluate = { cpu = 256, memory = 512, min_count = 1, max_count = 4, max_concurrency = 8 }
    finalize = { cpu = 256, memory = 512, min_count = 1, max_count = 4, max_concurrency = 8 }
  }

  validation {
    condition     = alltrue([for g in values(var.worker_groups) : g.min_count >= 1 && g.max_count >= g.min_count])
    error_message = "Every worker group needs min_count >= 1 (so queued work always has a worker) and max_count >= min_count."
  }
}

variable "redis_node_type" {
  description = "ElastiCache node type."
  type        = string
  default     = "cache.t4g.small"
}

variable "redis_engine_version" {
  description = "Redis engine version (7.x)."
  type        = string
  default     = "7.1"
}

variable "redis_snapshot_retention_days" {
  description = "Days of automatic ElastiCache snapshots."
  type        = number
  default     = 7
}

variable "log_retention_days" {
  description = "CloudWatch Logs retention for every log group."
  type        = number
  default     = 365
}

variable "master_requests_per_target" {
  description = "ALBRequestCountPerTarget (requests per minute per master task) autoscaling aims at."
  type        = number
  default     = 1000
}

variable "task_failure_rate_threshold" {
  description = "Alarm when more than this percentage of finished tasks failed over 15 minutes."
  type        = number
  default     = 5
}

variable "redis_memory_alarm_percent" {
  description = "Alarm when a Redis node uses more than this percentage of its maxmemory (DatabaseMemoryUsagePercentage). With noeviction, 100% means every write fails."
  type        = number
  default     = 75
}

variable "alarm_email" {
  description = "Email address subscribed to the alarm topic (empty: none; subscribe later)."
  type        = string
  default     = ""
}

variable "waf_rate_limit" {
  description = "Requests per 5 minutes one client IP may send before WAF blocks it."
  type        = number
  default     = 2000
}
