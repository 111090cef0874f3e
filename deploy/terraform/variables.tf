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
  description = "One worker service per capability: sizes, counts and MAX_CONCURRENCY (autoscaling aims at that many queued or running steps per task), and optionally an agent sidecar (see deploy/README.md, \"An agent beside the worker\")."
  type = map(object({
    # The worker container's share; with an agent, the task gets the sum of both.
    cpu             = number
    memory          = number
    min_count       = number
    max_count       = number
    max_concurrency = number
    # A second container in the same task, the agent the worker forwards each step to
    # (AGENT_KIND=http). It shares the task's network namespace, listens on 127.0.0.1:port
    # and is reachable by nothing but the worker. Unset: the built-in llm agent.
    agent = optional(object({
      # A full image URI with a pushed tag or a digest (your team's ECR repository).
      image = string
      # Where the agent listens, and its routes: the worker POSTs steps to `path` and polls
      # `health_path`; the container health check asks `health_path` too.
      port        = optional(number, 9000)
      path        = optional(string, "/step")
      health_path = optional(string, "/health")
      cpu         = optional(number, 256)
      memory      = optional(number, 512)
      # Plain settings (never credentials: those go in `secrets`).
      environment = optional(map(string), {})
      # Env name => ARN of a Secrets Manager secret or an SSM SecureString parameter.
      secrets = optional(map(string), {})
    }), null)
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

  # Fargate offers fixed CPU sizes, each with its own memory range; the task gets the
  # worker's share plus the agent's.
  validation {
    condition = alltrue([
      for g in values(var.worker_groups) : contains(lookup({
        "256"   = [512, 1024, 2048]
        "512"   = [1024, 2048, 3072, 4096]
        "1024"  = [for gb in range(2, 9) : gb * 1024]
        "2048"  = [for gb in range(4, 17) : gb * 1024]
        "4096"  = [for gb in range(8, 31) : gb * 1024]
        "8192"  = [for gb in range(16, 61, 4) : gb * 1024]
        "16384" = [for gb in range(32, 121, 8) : gb * 1024]
        }, tostring(g.cpu + (g.agent == null ? 0 : g.agent.cpu)), []),
      g.memory + (g.agent == null ? 0 : g.agent.memory))
    ])
    error_message = "A worker group's task size (cpu and memory, plus the agent's when it has one) must be a Fargate size: cpu 256 (memory 512, 1024 or 2048), 512 (1024-4096), 1024 (2048-8192), 2048 (4096-16384), 4096 (8192-30720) and so on, memory in steps of 1024 MiB."
  }

  # The agent's image: ECR repositories here are immutable, and a moving tag would let a
  # task that ECS replaces run different code from its siblings.
  validation {
    condition = alltrue([
      for g in values(var.worker_groups) :
      can(regex("^[a-z0-9.-]+(:[0-9]+)?/[a-z0-9._/-]+(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})$", g.agent.image))
      && !endswith(g.agent.image, ":latest")
      if g.agent != null
    ])
    error_message = "agent.image must be a full image URI with a pushed tag or a digest, e.g. 123456789012.dkr.ecr.us-west-2.amazonaws.com/team/critique-agent:3f2a9c1b7d4e (not untagged, not :latest)."
  }

  validation {
    condition = alltrue([
      for g in values(var.worker_groups) :
      g.agent.port == floor(g.agent.port) && g.agent.port >= 1024 && g.agent.port <= 65535 && g.agent.port != 5000
      if g.agent != null
    ])
    error_message = "agent.port must be a whole number from 1024 to 65535 and not 5000, the worker's own port in the same task (the image runs as uid 10001, which cannot bind below 1024)."
  }

  validation {
    condition = alltrue([
      for g in values(var.worker_groups) :
      can(regex("^/[A-Za-z0-9._~/-]*$", g.agent.path)) && can(regex("^/[A-Za-z0-9._~/-]*$", g.agent.health_path))
      if g.agent != null
    ])
    error_message = "agent.path and agent.health_path must be URL paths starting with / (letters, digits, . _ ~ - and /), e.g. \"/step\" and \"/health\"."
  }

  validation {
    condition = alltrue([
      for g in values(var.worker_groups) : g.agent.cpu >= 128 && g.agent.memory >= 128
      if g.agent != null
    ])
    error_message = "agent.cpu and agent.memory must be at least 128 (CPU units, MiB)."
  }

  validation {
    condition = alltrue(flatten([
      for g in values(var.worker_groups) : [
        for name in concat(keys(g.agent.environment), keys(g.agent.secrets)) :
        !contains(["PORT", "OPENAI_BASE_URL", "OPENAI_API_KEY"], name)
      ] if g.agent != null
    ]))
    error_message = "agent.environment and agent.secrets must not set PORT, OPENAI_BASE_URL or OPENAI_API_KEY: the module sets them (PORT from agent.port, the others to the llm-gateway and its GATEWAY_TOKEN)."
  }

  validation {
    condition = alltrue(flatten([
      for g in values(var.worker_groups) : [
        for name in keys(g.agent.environment) : !can(regex("(_PASSWORD|_TOKEN|_KEY|_KEYS|_SECRET)$", name))
      ] if g.agent != null
    ]))
    error_message = "agent.environment holds what looks like a credential (a name ending in _PASSWORD, _TOKEN, _KEY, _KEYS or _SECRET): put it in agent.secrets as an ARN, so it does not show in the task definition."
  }

  validation {
    condition = alltrue(flatten([
      for g in values(var.worker_groups) : [
        for arn in values(g.agent.secrets) : can(regex("^arn:aws[a-z-]*:(secretsmanager|ssm):[a-z0-9-]+:[0-9]{12}:(secret:|parameter/)", arn))
      ] if g.agent != null
    ]))
    error_message = "agent.secrets maps an env name to the ARN of a Secrets Manager secret (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME) or of an SSM parameter (arn:aws:ssm:REGION:ACCOUNT:parameter/NAME)."
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
