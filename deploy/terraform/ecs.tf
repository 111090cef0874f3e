# ECS on Fargate: the cluster, Cloud Map names, one task definition and one service per
# service (the master, the llm-gateway, one worker service per capability).
#
# Container definitions are `jsonencode` of literal objects merged onto
# local.container_base, with environment and secrets from the locals below: checks/tests
# holds each of them against the settings the service really reads (names, required
# settings, ports, health-check paths), so keep names literal.

locals {
  namespace = "${var.name}.local"
  ecr       = "${local.account_id}.dkr.ecr.${var.region}.amazonaws.com"

  # Worker SHUTDOWN_GRACE_MS defaults to 25 s: ECS waits stopTimeout after SIGTERM before
  # SIGKILL, so in-flight steps can finish and report.
  stop_timeout = 40

  # Every container: JSON logs, which CloudWatch Logs also reads as EMF metrics.
  common_env = [
    { name = "LOG_FORMAT", value = "json" },
    { name = "RUST_LOG", value = "info" },
  ]

  # ElastiCache: the primary endpoint over TLS, AUTH from Secrets Manager.
  redis_env = [
    { name = "REDIS_HOST", value = aws_elasticache_replication_group.redis.primary_endpoint_address },
    { name = "REDIS_PORT", value = "6379" },
    { name = "REDIS_TLS", value = "true" },
  ]

  # The gateway's settings; empty ones (LLM_MODEL by default) are left out: the provider
  # drops empty values when it reads a task definition back, so they would show as a
  # change on every plan, and an unset variable means the same to the gateway.
  gateway_env = [
    for e in concat(local.common_env, local.redis_env, [
      { name = "PORT", value = "7000" },
      # The usage ledger, budgets, cache and Idempotency-Key replay live in the same
      # Redis as the tasks, so the master shows each task's model usage.
      { name = "USE_REDIS", value = "true" },
      { name = "LLM_PROVIDER", value = var.llm_provider },
      { name = "LLM_MODEL", value = var.llm_model },
      # Bedrock's region; credentials come from the task role.
      { name = "AWS_REGION", value = var.region },
    ]) : e if e.value != ""
  ]

  master_url  = "http://master.${local.namespace}:8000"
  gateway_url = "http://llm-gateway.${local.namespace}:7000"

  secrets = {
    for service, names in local.service_secrets :
    service => [for name in names : { name = name, valueFrom = local.secret_arns[name] }]
  }

  # What every container shares: the image's non-root user, a read-only root filesystem
  # with a task-scoped scratch /tmp, an init process to reap children and pass signals, and
  # the drain time above.
  container_base = {
    essential              = true
    user                   = "10001:10001"
    readonlyRootFilesystem = true
    privileged             = false
    stopTimeout            = local.stop_timeout
    linuxParameters        = { initProcessEnabled = true }
    mountPoints            = [{ sourceVolume = "tmp", containerPath = "/tmp", readOnly = false }]
  }

  # Per worker group, its agent sidecar as a list of none or one, for the task definition.
  worker_agents = { for g, w in var.worker_groups : g => w.agent == null ? [] : [w.agent] }

  # Per worker group, the agent that serves its steps: the built-in llm one, or its sidecar
  # over HTTP. While the sidecar's health check fails the worker's /ready is 503 and its
  # registry record says unavailable, so the master sends it no steps.
  worker_agent_env = {
    for g, w in var.worker_groups : g => w.agent == null ? [
      { name = "AGENT_KIND", value = "llm" },
      ] : [
      { name = "AGENT_KIND", value = "http" },
      { name = "AGENT_URL", value = "http://127.0.0.1:${w.agent.port}${w.agent.path}" },
      { name = "AGENT_HEALTH_URL", value = "http://127.0.0.1:${w.agent.port}${w.agent.health_path}" },
    ]
  }
}

# No ECS Exec: its SSM agent needs a writable root filesystem, which every container here
# gives up (readonlyRootFilesystem), and the images carry no shell worth entering. Operators
# read the queues from CloudWatch or from a host inside the VPC (deploy/README.md).
resource "aws_ecs_cluster" "main" {
  #checkov:skip=CKV_AWS_224:ECS Exec is off (no service enables it; its agent cannot run on the read-only root filesystems), so there is no exec session to log or encrypt.
  name = local.prefix

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_ecs_cluster_capacity_providers" "main" {
  cluster_name       = aws_ecs_cluster.main.name
  capacity_providers = ["FARGATE"]

  default_capacity_provider_strategy {
    capacity_provider = "FARGATE"
    weight            = 1
  }
}

resource "aws_cloudwatch_log_group" "service" {
  for_each = toset(concat(["master", "llm-gateway"], [for g in keys(var.worker_groups) : "worker-${g}"]))

  name              = "/${var.name}/${var.environment}/${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}

# --- Cloud Map: workers reach master.ensemble.local and llm-gateway.ensemble.local.
resource "aws_service_discovery_private_dns_namespace" "main" {
  name        = local.namespace
  description = "Ensemble service names"
  vpc         = aws_vpc.main.id
}

resource "aws_service_discovery_service" "main" {
  for_each = toset(["master", "llm-gateway"])

  name = each.key

  dns_config {
    namespace_id   = aws_service_discovery_private_dns_namespace.main.id
    routing_policy = "MULTIVALUE"

    dns_records {
      ttl  = 10
      type = "A"
    }
  }

  # ECS registers only tasks whose container health check passes.
  health_check_custom_config {
    failure_threshold = 1
  }
}

# --- master
resource "aws_ecs_task_definition" "master" {
  family                   = "${local.prefix}-master"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.master_cpu
  memory                   = var.master_memory
  execution_role_arn       = aws_iam_role.execution["master"].arn
  task_role_arn            = aws_iam_role.task["master"].arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  volume {
    name = "tmp"
  }

  container_definitions = jsonencode([
    merge(local.container_base, {
      name         = "master"
      image        = "${aws_ecr_repository.service["master"].repository_url}:${var.image_tags["master"]}"
      portMappings = [{ containerPort = 8000, protocol = "tcp", name = "http" }]
      environment = concat(local.common_env, local.redis_env, [
        { name = "PORT", value = "8000" },
        # The queue metrics autoscaling and the alarms read (namespace Ensemble).
        { name = "METRICS_EMF", value = "true" },
      ])
      secrets = local.secrets["master"]
      healthCheck = {
        command     = ["CMD", "curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8000/health"]
        interval    = 15
        timeout     = 5
        retries     = 3
        startPeriod = 20
      }
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          awslogs-group         = aws_cloudwatch_log_group.service["master"].name
          awslogs-region        = var.region
          awslogs-stream-prefix = "master"
        }
      }
    }),
  ])
}

resource "aws_ecs_service" "master" {
  name                              = "master"
  cluster                           = aws_ecs_cluster.main.id
  task_definition                   = aws_ecs_task_definition.master.arn
  desired_count                     = var.master_min_count
  launch_type                       = "FARGATE"
  platform_version                  = "LATEST"
  propagate_tags                    = "SERVICE"
  enable_ecs_managed_tags           = true
  health_check_grace_period_seconds = 30

  network_configuration {
    subnets          = aws_subnet.private[*].id
    security_groups  = [aws_security_group.master.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.master.arn
    container_name   = "master"
    container_port   = 8000
  }

  service_registries {
    registry_arn = aws_service_discovery_service.main["master"].arn
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  lifecycle {
    # Autoscaling owns the count after the first apply.
    ignore_changes = [desired_count]
  }

  # ECS refuses a target group that no load balancer uses yet: the listener rules are what
  # attach it to the ALB, so the service waits for them, not only for the listener.
  depends_on = [aws_lb_listener_rule.client_paths, aws_lb_listener_rule.client_results]
}

# --- llm-gateway
resource "aws_ecs_task_definition" "gateway" {
  family                   = "${local.prefix}-llm-gateway"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.gateway_cpu
  memory                   = var.gateway_memory
  execution_role_arn       = aws_iam_role.execution["llm-gateway"].arn
  task_role_arn            = aws_iam_role.task["llm-gateway"].arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  volume {
    name = "tmp"
  }

  container_definitions = jsonencode([
    merge(local.container_base, {
      name         = "llm-gateway"
      image        = "${aws_ecr_repository.service["llm-gateway"].repository_url}:${var.image_tags["llm-gateway"]}"
      portMappings = [{ containerPort = 7000, protocol = "tcp", name = "http" }]
      environment  = local.gateway_env
      secrets      = local.secrets["llm-gateway"]
      healthCheck = {
        command     = ["CMD", "curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:7000/health"]
        interval    = 15
        timeout     = 5
        retries     = 3
        startPeriod = 20
      }
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          awslogs-group         = aws_cloudwatch_log_group.service["llm-gateway"].name
          awslogs-region        = var.region
          awslogs-stream-prefix = "llm-gateway"
        }
      }
    }),
  ])
}

resource "aws_ecs_service" "gateway" {
  name             = "llm-gateway"
  cluster          = aws_ecs_cluster.main.id
  task_definition  = aws_ecs_task_definition.gateway.arn
  desired_count    = var.gateway_count
  launch_type      = "FARGATE"
  platform_version = "LATEST"
  propagate_tags   = "SERVICE"

  network_configuration {
    subnets          = aws_subnet.private[*].id
    security_groups  = [aws_security_group.gateway.id]
    assign_public_ip = false
  }

  service_registries {
    registry_arn = aws_service_discovery_service.main["llm-gateway"].arn
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }
}

# --- workers: one task definition and service per capability.
#
# A group with `agent` runs the sidecar pattern: a second essential container, `agent`, in
# the same task. In awsvpc mode both share one network namespace, so the worker reaches the
# agent on 127.0.0.1 (AGENT_KIND=http) and nothing else can: the agent has no port
# mappings, it is meant to listen on 127.0.0.1, and even were it to listen on every
# interface, the workers' security group admits only the master, on 5000.
resource "aws_ecs_task_definition" "worker" {
  for_each = var.worker_groups

  family                   = "${local.prefix}-worker-${each.key}"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = each.value.agent == null ? each.value.cpu : each.value.cpu + each.value.agent.cpu
  memory                   = each.value.agent == null ? each.value.memory : each.value.memory + each.value.agent.memory
  execution_role_arn       = aws_iam_role.execution["worker"].arn
  task_role_arn            = aws_iam_role.task["worker"].arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  volume {
    name = "tmp"
  }

  # AGENT_ID and ADVERTISE_URL stay unset: each task generates its id and advertises the
  # address it reads from ECS_CONTAINER_METADATA_URI_V4.
  container_definitions = jsonencode(concat(
    [
      # Null entries (dependsOn without an agent) are left out, so a group without an agent
      # renders exactly as before and the provider sees no change.
      { for k, v in merge(local.container_base, {
        name         = "worker"
        image        = "${aws_ecr_repository.service["worker"].repository_url}:${var.image_tags["worker"]}"
        portMappings = [{ containerPort = 5000, protocol = "tcp", name = "http" }]
        environment = concat(local.common_env, local.redis_env, [
          { name = "PORT", value = "5000" },
          { name = "CAPABILITIES", value = jsonencode([each.key]) },
          { name = "MAX_CONCURRENCY", value = tostring(each.value.max_concurrency) },
          ], local.worker_agent_env[each.key], [
          { name = "MASTER_URL", value = local.master_url },
          { name = "LLM_GATEWAY_URL", value = local.gateway_url },
        ])
        secrets = local.secrets["worker"]
        # HEALTHY rather than START: the worker registers only once its agent answers, so a
        # task whose agent never comes up fails its deployment (and rolls back) instead of
        # running a worker that stays unavailable. ECS also stops containers in reverse
        # dependency order: on SIGTERM the worker drains first, its in-flight steps still
        # reaching the agent, and the agent stops after it.
        dependsOn = each.value.agent == null ? null : [{ containerName = "agent", condition = "HEALTHY" }]
        healthCheck = {
          command     = ["CMD", "curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:5000/health"]
          interval    = 15
          timeout     = 5
          retries     = 3
          startPeriod = 20
        }
        logConfiguration = {
          logDriver = "awslogs"
          options = {
            awslogs-group         = aws_cloudwatch_log_group.service["worker-${each.key}"].name
            awslogs-region        = var.region
            awslogs-stream-prefix = "worker"
          }
        }
      }) : k => v if v != null },
    ],
    [
      # The agent: the same hardening as every container (uid 10001, read-only root with a
      # scratch /tmp, init, 40 s to stop). It calls models through the llm-gateway's
      # OpenAI-compatible /v1 with the workers' GATEWAY_TOKEN, as the workers do.
      for agent in local.worker_agents[each.key] : merge(local.container_base, {
        name   = "agent"
        image  = agent.image
        cpu    = agent.cpu
        memory = agent.memory
        environment = concat([
          { name = "PORT", value = tostring(agent.port) },
          { name = "OPENAI_BASE_URL", value = "${local.gateway_url}/v1" },
        ], [for name, value in agent.environment : { name = name, value = value }])
        secrets = concat([
          { name = "OPENAI_API_KEY", valueFrom = local.secret_arns["GATEWAY_TOKEN"] },
        ], [for name, arn in agent.secrets : { name = name, valueFrom = arn }])
        # Python's urllib, not curl: agent images (python:3.12-slim for examples/ag2-agent)
        # need not carry curl, so the image must have python3 on its PATH. urlopen raises,
        # and the check fails, on a refused connection or any status of 400 or more.
        healthCheck = {
          command     = ["CMD", "python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${agent.port}${agent.health_path}', timeout=4)"]
          interval    = 10
          timeout     = 5
          retries     = 3
          startPeriod = 30
        }
        logConfiguration = {
          logDriver = "awslogs"
          options = {
            awslogs-group         = aws_cloudwatch_log_group.service["worker-${each.key}"].name
            awslogs-region        = var.region
            awslogs-stream-prefix = "agent"
          }
        }
      })
    ],
  ))
}

resource "aws_ecs_service" "worker" {
  for_each = var.worker_groups

  name             = "worker-${each.key}"
  cluster          = aws_ecs_cluster.main.id
  task_definition  = aws_ecs_task_definition.worker[each.key].arn
  desired_count    = each.value.min_count
  launch_type      = "FARGATE"
  platform_version = "LATEST"
  propagate_tags   = "SERVICE"

  network_configuration {
    subnets          = aws_subnet.private[*].id
    security_groups  = [aws_security_group.workers.id]
    assign_public_ip = false
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  lifecycle {
    ignore_changes = [desired_count]
  }
}
