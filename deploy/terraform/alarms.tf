# Alarms, to an SNS topic: task failure rate, a capability with queued work and no live
# worker, Redis errors seen by the services, sustained CPU above 80 %, Redis memory filling
# up (with noeviction a full Redis refuses writes), and masters the ALB considers unhealthy
# (their /ready fails when Redis is unreachable, a replica, or full).

resource "aws_sns_topic" "alarms" {
  name              = "${local.prefix}-alarms"
  kms_master_key_id = aws_kms_key.main.arn
}

resource "aws_sns_topic_subscription" "email" {
  count = var.alarm_email == "" ? 0 : 1

  topic_arn = aws_sns_topic.alarms.arn
  protocol  = "email"
  endpoint  = var.alarm_email
}

# ElastiCache events (failover, node replacement, snapshot failures) need a topic of their
# own: ElastiCache cannot publish to an encrypted topic, with a customer key or with the
# AWS-managed alias/aws/sns alike (an encrypted topic shows as "inactive" and its events are
# dropped), and the topic policy must allow it through aws:SourceOwner, not the
# aws:SourceAccount that new topics get by default. Source: the ElastiCache guide, "Event
# Notifications and Amazon SNS". These events carry names and times, no data or secrets.
resource "aws_sns_topic" "elasticache_events" {
  #checkov:skip=CKV_AWS_26:ElastiCache cannot publish to an encrypted SNS topic (any key); its events hold cluster names and times only.
  name = "${local.prefix}-elasticache-events"
}

resource "aws_sns_topic_policy" "elasticache_events" {
  arn = aws_sns_topic.elasticache_events.arn
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "SameAccountPublishers"
      Effect    = "Allow"
      Principal = { AWS = "*" }
      Action    = ["sns:Publish", "sns:GetTopicAttributes", "sns:Subscribe"]
      Resource  = aws_sns_topic.elasticache_events.arn
      Condition = { StringEquals = { "AWS:SourceOwner" = local.account_id } }
    }]
  })
}

resource "aws_sns_topic_subscription" "elasticache_email" {
  count = var.alarm_email == "" ? 0 : 1

  topic_arn = aws_sns_topic.elasticache_events.arn
  protocol  = "email"
  endpoint  = var.alarm_email
}

locals {
  alarm_actions = [aws_sns_topic.alarms.arn]
  ecs_services  = concat(["master", "llm-gateway"], [for g in keys(var.worker_groups) : "worker-${g}"])
}

# TasksFailed / TasksSucceeded: EMF counters the master publishes, no dimension.
resource "aws_cloudwatch_metric_alarm" "task_failure_rate" {
  alarm_name          = "${local.prefix}-task-failure-rate"
  alarm_description   = "More than ${var.task_failure_rate_threshold}% of finished tasks failed"
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.task_failure_rate_threshold
  evaluation_periods  = 3
  datapoints_to_alarm = 3
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  metric_query {
    id = "failed"
    metric {
      namespace   = "Ensemble"
      metric_name = "TasksFailed"
      period      = 300
      stat        = "Sum"
    }
  }

  metric_query {
    id = "succeeded"
    metric {
      namespace   = "Ensemble"
      metric_name = "TasksSucceeded"
      period      = 300
      stat        = "Sum"
    }
  }

  metric_query {
    id          = "rate"
    label       = "Failed tasks, %"
    expression  = "IF(failed + succeeded > 0, 100 * failed / (failed + succeeded), 0)"
    return_data = true
  }
}

resource "aws_cloudwatch_metric_alarm" "no_live_workers" {
  for_each = var.worker_groups

  alarm_name          = "${local.prefix}-no-live-workers-${each.key}"
  alarm_description   = "Steps are queued for ${each.key} but no ${each.key} worker is alive"
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  evaluation_periods  = 3
  datapoints_to_alarm = 3
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  metric_query {
    id = "live"
    metric {
      namespace   = "Ensemble"
      metric_name = "LiveWorkers"
      dimensions  = { Capability = each.key }
      period      = 60
      stat        = "Minimum"
    }
  }

  metric_query {
    id = "depth"
    metric {
      namespace   = "Ensemble"
      metric_name = "QueueDepth"
      dimensions  = { Capability = each.key }
      period      = 60
      stat        = "Maximum"
    }
  }

  metric_query {
    id          = "stranded"
    label       = "Work queued with no live worker"
    expression  = "IF(live < 1 AND depth > 0, 1, 0)"
    return_data = true
  }
}

# Redis errors, from the services' JSON logs: every Redis outage a master or a worker sees
# (a request, the dispatch loop, a heartbeat) is logged with the message
# common::redis::UNAVAILABLE_LOG; checks/tests/deploy holds this pattern to that constant.
resource "aws_cloudwatch_log_metric_filter" "redis_errors" {
  for_each = toset(concat(["master"], [for g in keys(var.worker_groups) : "worker-${g}"]))

  name           = "${local.prefix}-${each.key}-redis-errors"
  log_group_name = aws_cloudwatch_log_group.service[each.key].name
  pattern        = "{ $.message = \"redis unavailable\" }"

  metric_transformation {
    namespace     = "Ensemble"
    name          = "RedisErrors"
    value         = "1"
    default_value = "0"
  }
}

resource "aws_cloudwatch_metric_alarm" "redis_errors" {
  alarm_name          = "${local.prefix}-redis-errors"
  alarm_description   = "Services report Redis unavailable"
  namespace           = "Ensemble"
  metric_name         = "RedisErrors"
  statistic           = "Sum"
  period              = 60
  evaluation_periods  = 3
  datapoints_to_alarm = 1
  # Any line: the dispatch loop and each worker's heartbeat log an outage once, when it
  # starts, so a quiet system's outage is a handful of lines, not a rate.
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

  depends_on = [aws_cloudwatch_log_metric_filter.redis_errors]
}

resource "aws_cloudwatch_metric_alarm" "master_unhealthy" {
  alarm_name          = "${local.prefix}-master-unhealthy"
  alarm_description   = "The ALB sees master tasks failing /ready (Redis unreachable or the task broken)"
  namespace           = "AWS/ApplicationELB"
  metric_name         = "UnHealthyHostCount"
  dimensions          = { LoadBalancer = aws_lb.public.arn_suffix, TargetGroup = aws_lb_target_group.master.arn_suffix }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 3
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "service_cpu" {
  for_each = toset(local.ecs_services)

  alarm_name          = "${local.prefix}-${each.key}-cpu-high"
  alarm_description   = "${each.key} CPU above 80% for 15 minutes"
  namespace           = "AWS/ECS"
  metric_name         = "CPUUtilization"
  dimensions          = { ClusterName = aws_ecs_cluster.main.name, ServiceName = each.key }
  statistic           = "Average"
  period              = 300
  evaluation_periods  = 3
  threshold           = 80
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "missing"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "redis_cpu" {
  for_each = toset(["001", "002"])

  alarm_name          = "${local.prefix}-redis-${each.key}-cpu-high"
  alarm_description   = "Redis node ${each.key} engine CPU above 80% for 15 minutes"
  namespace           = "AWS/ElastiCache"
  metric_name         = "EngineCPUUtilization"
  dimensions          = { CacheClusterId = "${aws_elasticache_replication_group.redis.id}-${each.key}" }
  statistic           = "Average"
  period              = 300
  evaluation_periods  = 3
  threshold           = 80
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "missing"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

# With maxmemory-policy noeviction (elasticache.tf) a full Redis refuses every write: the
# master answers 507 storage_full until an operator frees memory or moves to a larger node.
# Alarm while there is still room to act.
resource "aws_cloudwatch_metric_alarm" "redis_memory" {
  for_each = toset(["001", "002"])

  alarm_name          = "${local.prefix}-redis-${each.key}-memory-high"
  alarm_description   = "Redis node ${each.key} uses more than ${var.redis_memory_alarm_percent}% of its maxmemory; at 100% writes fail (507 storage_full)"
  namespace           = "AWS/ElastiCache"
  metric_name         = "DatabaseMemoryUsagePercentage"
  dimensions          = { CacheClusterId = "${aws_elasticache_replication_group.redis.id}-${each.key}" }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  threshold           = var.redis_memory_alarm_percent
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "missing"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}
